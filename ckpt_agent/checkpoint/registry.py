"""Where a running `ckpt run` is found: its registration (`<runtime dir>/jobs/<job>.<step>.json`, next to its control
socket), written by the wrapper (runner.py) and read by `ckpt checkpoint`, `ckpt list` and the node agent.

A module of its own, light to import: `ckpt checkpoint` only needs to find the wrapper and talk to it, and would
otherwise import the whole engine (about 0.15 s of every checkpoint a user or the agent asks for).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

from ckpt_agent.errors import NotFoundError, PermissionDenied
from ckpt_agent.util.safeio import read_regular
from ckpt_agent.util.usercreds import owner_of_path

log = logging.getLogger(__name__)

REGISTRATION_MAX_BYTES = 64 << 10  # a registration is a few hundred bytes of JSON


def registration_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "jobs")


def registration_paths(runtime_dir: str, job_id: str, step: str):
    base = os.path.join(registration_dir(runtime_dir), f"{job_id}.{step}")
    return base + ".json", base + ".sock"


def find_registration(runtime_dir: str, job_id: str, step: str) -> Dict[str, Any]:
    path, _ = registration_paths(runtime_dir, job_id, step)
    try:
        reg = json.loads(read_regular(path, REGISTRATION_MAX_BYTES, follow=False))
        if not isinstance(reg, dict):
            raise ValueError("not a JSON object")
        return reg
    except FileNotFoundError:
        raise NotFoundError(
            f"job {job_id} step {step} is not running under ckpt run on this machine ({path})"
        ) from None
    except PermissionError:
        raise PermissionDenied(f"job {job_id} step {step} belongs to {owner_of_path(path)}: only its owner "
                               "or root may act on it") from None
    except (OSError, ValueError) as e:
        raise NotFoundError(f"{path}: unreadable registration ({e})") from e


def process_start_time(pid: Any) -> Optional[int]:
    """When a process started (clock ticks after boot, /proc/PID/stat field 22), or None when there is no such
    process: with the pid, it names one process for good, whatever pids the kernel reuses later."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
        return int(data.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError, TypeError):
        return None


def process_state(pid: Any) -> Optional[str]:
    """A process's state letter (/proc/PID/stat field 3: R, S, D, T, Z...), or None when there is no such process."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError, TypeError):
        return None


def registration_alive(reg: Dict[str, Any]) -> bool:
    """The wrapper that wrote a registration still runs. A wrapper killed outright (SIGKILL at `scancel`'s KillWait,
    a node's OOM killer) leaves its registration behind: acting on it would requeue a job that has ended."""
    started = process_start_time(reg.get("pid"))
    return started is not None and reg.get("pid_start") in (None, started)


def list_registrations(runtime_dir: str) -> List[Dict[str, Any]]:
    """Registrations of wrappers that still run on this node, each with `_owner_uid` (who wrote the file)."""
    out = []
    d = registration_dir(runtime_dir)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(".json"):
            path = os.path.join(d, name)
            try:  # the directory is world-writable: a FIFO or a huge file planted there is refused, never waited on
                reg = json.loads(read_regular(path, REGISTRATION_MAX_BYTES))
                reg["_owner_uid"] = os.stat(path, follow_symlinks=False).st_uid
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring %s: not a registration (%s)", path, e)
                continue
            if registration_alive(reg):
                out.append(reg)
            else:
                remove_stale_registration(path, reg)
    return out


def remove_stale_registration(path: str, reg: Dict[str, Any]) -> None:
    """Remove the registration (and socket) a wrapper killed outright left behind; it names a process that is gone
    for good (pid and start time), so no live wrapper can lose its own. Without the right to remove it (another
    user's, seen by an ordinary user's `ckpt list`), it is only ignored."""
    sock = path[: -len(".json")] + ".sock"
    for p in (path, sock):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.info("ignoring %s: its wrapper (pid %s) is gone (%s)", p, reg.get("pid"), e.strerror)
            return
    log.info("removed %s: its wrapper (pid %s) is gone", path, reg.get("pid"))
