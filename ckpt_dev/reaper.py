"""Stop everything a local cluster started, whatever became of the process that started it.

What belongs to the cluster in WORKDIR is found two ways, so that nothing escapes:
  - every process it starts (munged, slurmctld, slurmd, accounting, the node agents, and every job process, since
    slurmd passes its environment on) carries SLURM_CONF=<WORKDIR>/etc/slurm.conf in its environment;
  - the daemons' pids are recorded with their start times in <WORKDIR>/run/daemons.pids (`record`), so a daemon
    that scrubbed its environment is still found and a reused pid is never hit.

`stop_workdir(WORKDIR)` sends SIGTERM to the recorded daemons still alive, waits a few seconds, then thaws and
SIGKILLs every process left that belongs to the cluster, and waits until they are gone. Three callers:
  1. `LocalCluster.stop()`, after its orderly shutdown, for whatever is left (slurmstepd and jobs outlive slurmd);
  2. `python -m ckpt_dev.reaper stop WORKDIR`: by hand, or from a test's `finally`;
  3. the watchdog `python -m ckpt_dev.reaper watch WORKDIR`, which `LocalCluster.start()` spawns in a
     session of its own with a pipe on its stdin. Only the cluster's owner holds the pipe's write end, so EOF means
     the owner is gone, even by SIGKILL; unless the owner wrote `stopped` first, the watchdog stops the cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Tuple

log = logging.getLogger(__name__)

PIDS_FILE = os.path.join("run", "daemons.pids")
CGROUP_V1_FREEZER = "/sys/fs/cgroup/freezer"
TERM_GRACE_SECONDS = 5  # daemons get this long to exit on SIGTERM before everything is killed
GONE_TIMEOUT_SECONDS = 20  # a SIGKILLed process is normally gone within milliseconds; a loaded machine takes longer
POLL_SECONDS = 0.1
STOPPED = b"stopped\n"  # what an owner that stopped its cluster tells the watchdog


def conf_path(workdir: str) -> str:
    """The cluster's slurm.conf, whose path every process of the cluster carries as SLURM_CONF."""
    return os.path.join(os.path.abspath(workdir), "etc", "slurm.conf")


def _start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, a process's identity; None if gone or a
    zombie (which is as good as gone: it holds nothing but its exit status)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def alive(pid: int) -> bool:
    return _start_time(pid) is not None


def record(workdir: str, name: str, pid: int) -> None:
    """Remember a daemon of the cluster in WORKDIR (one line: name, pid, start time)."""
    start = _start_time(pid)
    if start is None:
        return
    path = os.path.join(workdir, PIDS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{name} {pid} {start}\n")


def recorded(workdir: str) -> List[Tuple[str, int]]:
    """The recorded daemons that still run (same pid and start time), in the order they started."""
    out = []
    try:
        with open(os.path.join(workdir, PIDS_FILE), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and _start_time(int(parts[1])) == parts[2]:
            out.append((parts[0], int(parts[1])))
    return out


def processes(workdir: str, exclude: Iterable[int] = ()) -> List[int]:
    """Live processes of the cluster in WORKDIR: those carrying its SLURM_CONF, and its recorded daemons (the
    watchdog among them), except this process and `exclude`."""
    marker = f"SLURM_CONF={conf_path(workdir)}".encode()
    skip = {os.getpid(), *exclude}
    found = {pid for _, pid in recorded(workdir) if pid not in skip}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0") and alive(int(entry)):
                    found.add(int(entry))
        except OSError:
            continue
    return sorted(found)


def thaw(pid: int) -> None:
    """A process in a frozen cgroup (a job stopped for a checkpoint) cannot die until its cgroup is thawed."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if path == "/":
            continue
        if "freezer" in controllers.split(","):
            state = os.path.join(CGROUP_V1_FREEZER, path.lstrip("/"), "freezer.state")
        elif controllers == "":  # cgroup v2: cgroup.freeze in the unified hierarchy
            state = os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cgroup.freeze")
        else:
            continue
        try:
            with open(state, "w", encoding="utf-8") as out:
                out.write("THAWED" if state.endswith("freezer.state") else "0")
        except OSError:
            continue


def kill(pids: Iterable[int], timeout: float = GONE_TIMEOUT_SECONDS) -> List[int]:
    """Thaw and SIGKILL `pids`, then wait until they are gone; the pids that survived `timeout` (D state)."""
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        thaw(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return wait_gone(pids, timeout)


def wait_gone(pids: Iterable[int], timeout: float) -> List[int]:
    """Wait until none of `pids` runs (zombies count as gone); those still running after `timeout`."""
    left = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in left if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(POLL_SECONDS)


def stop_workdir(workdir: str, grace: float = TERM_GRACE_SECONDS, exclude: Iterable[int] = ()) -> Dict[str, List[int]]:
    """Stop whatever runs of the cluster in WORKDIR but `exclude` (and this process). Idempotent; never raises for
    a process that vanished.

    1. SIGTERM the recorded daemons still alive, so slurmd and slurmctld can tidy up, and wait up to `grace`;
    2. thaw and SIGKILL every process of the cluster left (daemons, agents, slurmstepd, job processes);
    3. wait until they are gone, bounded; report the pids killed and any that survived.
    """
    workdir = os.path.abspath(workdir)
    skip = {os.getpid(), *exclude}
    daemons = [pid for name, pid in recorded(workdir) if pid not in skip and name != "watchdog"]
    for pid in daemons:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            continue
    wait_gone(daemons, grace)
    left = processes(workdir, exclude=skip)
    survivors = kill(left)
    if left:
        log.info("killed %d leftover process(es) of the local cluster in %s: %s", len(left), workdir, left)
    if survivors:
        log.error("processes of the local cluster in %s survived SIGKILL: %s", workdir, survivors)
    return {"killed": left, "survivors": survivors}


class Watchdog:
    """The watchdog process of one cluster: `start()` after the first daemon is recorded, `release()` once the
    owner has stopped the cluster itself."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self._proc: Optional[subprocess.Popen] = None
        self._fd: Optional[int] = None

    def start(self) -> Watchdog:
        if self._proc is not None:
            return self
        read_end, self._fd = os.pipe()  # both ends close-on-exec: no other child of ours inherits the write end
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # it must not look like the cluster's
        # the checkout: ckpt_dev is not part of the installed package
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        out = open(os.path.join(self.workdir, "log", "watchdog.log"), "ab")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ckpt_dev.reaper", "watch", self.workdir],
                stdin=read_end, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/",
                start_new_session=True,  # neither Ctrl-C in the terminal nor the owner's process group reach it
            )
        finally:
            os.close(read_end)
            out.close()
        record(self.workdir, "watchdog", self._proc.pid)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def release(self, timeout: float = 5) -> None:
        """Tell the watchdog the cluster is stopped, and reap it."""
        if self._fd is not None:
            try:
                os.write(self._fd, STOPPED)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def watch(workdir: str) -> int:
    """Block until stdin reaches EOF; stop the cluster unless the owner said it had stopped it."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # only the owner's end of the pipe decides
    data = b""
    while True:
        try:
            chunk = os.read(0, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    if STOPPED in data:
        return 0
    print(f"{time.strftime('%H:%M:%S')} the owner of the local cluster in {workdir} went away without stopping "
          "it: stopping it", flush=True)
    result = stop_workdir(workdir)
    print(f"{time.strftime('%H:%M:%S')} killed {result['killed']}; survivors {result['survivors']}", flush=True)
    return 1 if result["survivors"] else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_dev.reaper",
                                     description="stop the local Slurm cluster whose work directory is WORKDIR")
    parser.add_argument("action", choices=("stop", "watch"),
                        help="stop: now; watch: when stdin reaches EOF without 'stopped' (LocalCluster's watchdog)")
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "watch":
        return watch(args.workdir)
    result = stop_workdir(args.workdir)
    print(f"stopped the local cluster in {args.workdir}: killed {len(result['killed'])} process(es)"
          + (f", {len(result['survivors'])} survived SIGKILL: {result['survivors']}" if result["survivors"] else ""))
    return 1 if result["survivors"] else 0


if __name__ == "__main__":
    sys.exit(main())
