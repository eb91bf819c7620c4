"""Helpers for tests that drive the real `ckpt` command with real CRIU (not fixtures: conftest.py is shared)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
BACKSTOP_SCALE_ENV = "CKPT_TEST_BACKSTOP_SCALE"


def backstop(seconds: float) -> float:
    """A step's safety net (a wait that ends on an event long before it), times CKPT_TEST_BACKSTOP_SCALE: at least 1,
    set by scripts/kernel-vm-check.sh for guests under qemu's software emulation, where a step takes 10-40x what it
    takes here. A net only: no test waits for it to pass, so a larger one slows nothing that works."""
    raw = os.environ.get(BACKSTOP_SCALE_ENV) or "1"
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale >= 1:  # also NaN
        raise pytest.UsageError(f"{BACKSTOP_SCALE_ENV}={raw!r}: must be a number of at least 1")
    return seconds * scale


def criu_binary() -> str:
    return shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin") or ""


def require_criu() -> None:
    """CRIU tests need root and CRIU >= 4.2.1; in CI their absence is a failure, not a skip."""
    if os.geteuid() != 0 or not criu_binary():
        if os.environ.get("CI"):
            pytest.fail("CRIU tests need root and criu (make setup installs it)")
        pytest.skip("needs root and criu")


def ckpt_env(store: Path, runtime: Path, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    # defaults plus the environment, whatever /etc holds; root's jobs create their signing key here, not in /etc
    config = store.parent / "agent.yaml"
    key = store.parent / "secret" / "node.key"
    config.write_text(json.dumps({"agent": {"key_file": str(key)}}) + "\n")
    if not key.exists():  # as a cluster's bootstrap places it: a job's first run then says nothing about keys
        key.parent.mkdir(mode=0o755, exist_ok=True)
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
    env.update(CKPT_STORE=str(store), CKPT_RUNTIME_DIR=str(runtime), CKPT_CONFIG=str(config))
    env["PATH"] = "/usr/local/sbin:" + env.get("PATH", "")
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def ckpt_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "ckpt_agent", *args]


def run_ckpt(*args: str, env: Dict[str, str], cwd: Optional[Path] = None, timeout: float = 120,
             stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(ckpt_cmd(*args), env=env, cwd=cwd, timeout=backstop(timeout), stdout=stdout,
                          stderr=subprocess.PIPE, text=True)


def start_ckpt(*args: str, env: Dict[str, str], cwd: Path, out: Path, err: Path) -> subprocess.Popen:
    return subprocess.Popen(ckpt_cmd(*args), env=env, cwd=cwd, stdout=open(out, "ab"), stderr=open(err, "ab"),
                            start_new_session=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """`predicate`'s first true value, polled; a failure after backstop(timeout)."""
    timeout = backstop(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def processes_of(workdir: str) -> List[int]:
    """Live processes belonging to a local cluster (or demo) in `workdir`: its daemons (workdir in argv) and its jobs
    and agents (SLURM_CONF under workdir in their environment). The tests' own view, independent of
    ckpt_dev.reaper, which it checks."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                zombie = fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if not zombie and (workdir.encode() in cmdline or f"SLURM_CONF={workdir}/".encode() in environ):
            found.append(int(entry))
    return found


def registered(runtime: Path, job: str, step: str = "main") -> bool:
    return (runtime / "jobs" / f"{job}.{step}.json").exists()


def kill_job(proc: subprocess.Popen, runtime: Path, job: str, step: str = "main") -> None:
    """SIGKILL the wrapper and the whole tool tree at once, as when an instance is lost without notice."""
    import json
    import signal

    reg = json.loads((runtime / "jobs" / f"{job}.{step}.json").read_text())
    for pid in (reg["init_pid"], proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)  # killing the namespace init kills every process of the tool
        except ProcessLookupError:
            pass
    proc.wait(timeout=backstop(10))


def stop_ckpt_run(proc: subprocess.Popen, runtime: Path, job: str, step: str = "main") -> None:
    """On a test's failure path: a `ckpt run` still running is killed with its job's tree (kill_job), which a restored
    tree needs (it is no child of the wrapper's once the wrapper dies); one not registered yet, by itself."""
    if proc.poll() is not None:
        return
    try:
        kill_job(proc, runtime, job, step)
    except (OSError, ValueError, KeyError):
        proc.kill()
        proc.wait()


def keep_or_remove(request, workdir: str, what: str) -> None:
    """A stopped cluster's work directory: kept for its logs when a test failed or CKPT_KEEP_CLUSTER=1, else removed."""
    if request.session.testsfailed or os.environ.get("CKPT_KEEP_CLUSTER") == "1":
        print(f"\n{what} kept for inspection: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def store_with_job(tmp_path: Path, job: str, step: str = "main"):
    """An empty checkpoint store below `tmp_path` with the directories of one job step made."""
    from ckpt_agent.store.generations import CheckpointStore

    root = tmp_path / "store"
    root.mkdir()
    store = CheckpointStore(str(root))
    store.ensure_job(job, step)
    return store


def page_tool_verdict(work) -> str:
    """Ask the page tool (data/runner/pagetool.py) running in `work` to compare its memory with what its seeds say;
    its verdict."""
    work = Path(work)
    (work / "check").touch()
    wait_for(lambda: (work / "checked").exists(), 60, "the tool to check its memory")
    verdict = (work / "checked").read_text().strip()
    (work / "checked").unlink()
    return verdict


def written_only_here() -> bool:
    """This kernel tracks written pages and the CRIU on PATH can dump only those: userfaultfd (adapters/uffd.py)
    with patch 0002, or soft-dirty bits (adapters/softdirty.py) with patch 0003, as engine.py chooses."""
    from ckpt_agent.adapters.criu import Criu
    from ckpt_agent.adapters.softdirty import SoftDirtyTracker
    from ckpt_agent.adapters.uffd import DirtyTracker

    criu = Criu(criu_binary() or "criu")
    return ((criu.can_dump_uffd_written() and DirtyTracker.supported())
            or (criu.can_dump_soft_dirty_written() and SoftDirtyTracker.supported()))


def whole_huge_pages_tracked() -> bool:
    """Dirty tracking here marks a transparent huge page written as a whole (soft-dirty, adapters/softdirty.py, with
    THP always on): a 5% change at random places then leaves few pages unmarked."""
    from ckpt_agent.adapters.uffd import DirtyTracker

    if not written_only_here() or DirtyTracker.supported():
        return False
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def restore_page_tool_and_check(job: str, argv: List[str], env: Dict[str, str], work: Path, out: Path,
                                err: Path) -> None:
    """`ckpt run` the page tool's job again (a restore), ask it to check its memory (page_tool_verdict: intact,
    after its change), stop it, and expect exit 0; on any failure the wrapper and the tool are killed."""
    proc = start_ckpt("run", "--job-id", job, "--", *argv, env=env, cwd=work, out=out, err=err)
    try:
        assert page_tool_verdict(work) == "intact mutated=True"
        (work / "stop").touch()
        assert proc.wait(timeout=backstop(60)) == 0
    finally:
        stop_ckpt_run(proc, Path(env["CKPT_RUNTIME_DIR"]), job)


def pages_images(manifest):
    """The pages-N.img entries of a manifest as stored (JSON)."""
    return [i for i in manifest["images"] if i["name"].startswith("pages-")]


class CallCounter:
    """Counts the calls of `module.name` during one test (monkeypatched), passing each on to the real function."""

    def __init__(self, monkeypatch, module, name: str):
        self.n = 0
        real = getattr(module, name)

        def counting(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(module, name, counting)
