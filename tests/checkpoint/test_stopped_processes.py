"""A process the job stopped itself (SIGSTOP, SIGTSTP) stays stopped across checkpoints and restores, with real
CRIU: the engine lets the tree CRIU left stopped run again, but not the processes CRIU recorded as stopped
(engine._held, from the dump's core images), after a periodic checkpoint and after a restore it armed."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Optional

import pytest
from ckpt_helpers import backstop, run_ckpt, start_ckpt, stop_ckpt_run, wait_for, written_only_here

pytestmark = pytest.mark.criu

MARK = "stopped-7301"  # in the tool's argv, so in its child's (a fork)
TOOL = """
import os, signal, sys, time
child = os.fork()
if child == 0:
    os.kill(os.getpid(), signal.SIGSTOP)  # the job stops one of its processes itself
    while True:
        time.sleep(1)
os.waitpid(child, os.WUNTRACED)  # it is stopped now
open("ready", "w").close()
n = 0
while True:
    n += 1
    with open("count.tmp", "w") as fh:
        fh.write(str(n))
    os.replace("count.tmp", "count")
    time.sleep(0.05)
"""


def _stream(env, mode: str) -> None:
    config = Path(env["CKPT_CONFIG"])
    data = json.loads(config.read_text())
    data["checkpoint"] = {"stream": mode}
    config.write_text(json.dumps(data) + "\n")


def _stopped_one(work: Path) -> Optional[int]:
    """The host pid of the tool's child: of the processes with the tool's argv (the wrapper and the namespace's init
    have it too), the one that is no other's parent."""
    tool = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if MARK.encode() in Path("/proc", entry, "cmdline").read_bytes() and \
                    os.readlink(f"/proc/{entry}/cwd") == str(work):
                tool[int(entry)] = int(Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    leaves = [pid for pid, ppid in tool.items() if ppid in tool and pid not in tool.values()]
    return leaves[0] if len(leaves) == 1 else None


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _count(work: Path) -> int:
    try:
        return int((work / "count").read_text() or 0)
    except (OSError, ValueError):
        return 0


def _runs_on(work: Path) -> None:
    """The rest of the job runs: its loop counts on."""
    now = _count(work)
    wait_for(lambda: _count(work) > now + 2, 30, "the job's loop to run again")


@pytest.mark.parametrize("mode", ["always", "off"])
def test_a_periodic_checkpoint_leaves_the_process_the_job_stopped_stopped(ck, tmp_path, mode):
    env, _store, runtime = ck
    _stream(env, mode)
    work = tmp_path / "work"
    work.mkdir()
    proc = start_ckpt("run", "--job-id", "41", "--interval", "100000", "--", "python3", "-c", TOOL, MARK, env=env,
                      cwd=work, out=tmp_path / "out", err=tmp_path / "err")
    try:
        wait_for(lambda: (work / "ready").exists(), 60, "the job to stop its child")
        pid = _stopped_one(work)
        assert pid and _state(pid) == "T"
        for _ in range(2):  # the second dump finds it stopped by the first's resume as well
            res = run_ckpt("checkpoint", "--job-id", "41", env=env)
            assert res.returncode == 0, res.stderr
            assert _state(pid) == "T"  # the SIGCONT to the others was sent before the command returned
            _runs_on(work)
    finally:
        stop_ckpt_run(proc, runtime, "41")


def _final_then_restored(env, runtime: Path, tmp_path: Path, mode: str, job: str, before_final=lambda: None):
    """The tool under `ckpt run` (checkpoint.stream `mode`), `before_final()` once it stopped its child, a final
    checkpoint, then `ckpt run` again: the new wrapper once it says the tool is resumed (the caller stops it)."""
    _stream(env, mode)
    if mode == "always" and not written_only_here():
        pytest.skip("the engine resumes a restored tree itself only with dirty tracking (Linux >= 6.13 on x86_64)")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["run", "--job-id", job, "--interval", "100000", "--", "python3", "-c", TOOL, MARK]
    proc = start_ckpt(*argv, env=env, cwd=work, out=tmp_path / "out", err=tmp_path / "err")
    try:
        wait_for(lambda: (work / "ready").exists(), 60, "the job to stop its child")
        before_final()
        final = run_ckpt("checkpoint", "--job-id", job, "--final", env=env)
        assert final.returncode == 0, final.stderr
        assert proc.wait(timeout=backstop(30)) == 75
        assert _stopped_one(work) is None
        proc = start_ckpt(*argv, env=env, cwd=work, out=tmp_path / "out2", err=tmp_path / "err2")
        wait_for(lambda: "resumed job" in (tmp_path / "err2").read_text(), 60, "the restore")
        return proc
    except BaseException:
        stop_ckpt_run(proc, runtime, job)
        raise


@pytest.mark.parametrize("mode", ["always", "off"])
def test_a_restored_job_gets_its_stopped_process_back_stopped(ck, tmp_path, mode):
    env, _store, runtime = ck
    work = tmp_path / "work"
    proc = _final_then_restored(env, runtime, tmp_path, mode, "42")
    try:
        _runs_on(work)
        pid = _stopped_one(work)
        assert pid and _state(pid) == "T"
    finally:
        stop_ckpt_run(proc, runtime, "42")


@pytest.mark.parametrize("mode", ["always", "off"])
def test_a_job_suspended_when_checkpointed_runs_when_restored(ck, tmp_path, mode):
    """Slurm's suspend stops every process of a job, the namespace's init too (which nothing inside can stop). A
    requeued job is not suspended: restored, all of it runs, the process the job had stopped itself too."""
    from ckpt_agent.checkpoint.capture import ns_pids

    env, _store, runtime = ck
    work = tmp_path / "work"

    def suspend() -> None:  # as slurmstepd does: SIGSTOP to every process of the job
        tree = ns_pids(json.loads((runtime / "jobs" / "43.main.json").read_text())["init_pid"])
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: all(_state(pid) == "T" for pid in tree), 30, "the whole job to stop")

    proc = _final_then_restored(env, runtime, tmp_path, mode, "43", suspend)
    try:
        _runs_on(work)
        pid = wait_for(lambda: _stopped_one(work), 30, "the tool's child")
        wait_for(lambda: _state(pid) != "T", 30, "the tool's child to run")
    finally:
        stop_ckpt_run(proc, runtime, "43")
