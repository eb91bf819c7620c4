"""The dump guard (checkpoint/dumpguard.py): what it reads from the checkpointer, and what it does once the
checkpointer is gone without saying the tree runs again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_helpers import wait_for

from ckpt_agent.checkpoint import dumpguard
from ckpt_agent.checkpoint.engine import DUMPGUARD


@pytest.mark.parametrize("written, verdict, held", [
    (b"", b"", set()),
    (b"R", b"R", set()),
    (b"H12,34;K", b"K", {12, 34}),
    (b"H1;H2,3;", b"", {2, 3}),  # the last hold message counts
    (b"H5;H6", b"", {5}),  # one not whole yet is not read
    (b"KR", b"R", set()),
])
def test_the_guard_reads_the_verdict_and_the_held_processes(written, verdict, held):
    assert dumpguard.parse(written) == (verdict, held)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (PID namespace)")
def test_a_guard_whose_checkpointer_died_resumes_the_tree_but_the_processes_the_job_had_stopped(tmp_path):
    """A tree in a PID namespace of its own, stopped as CRIU's --leave-stopped leaves it; the checkpointer named one
    process held and died (its end of the pipe closed, no b"R"): the guard resumes the others only."""
    tree = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c", "sleep 600 & sleep 600 & wait"],
                            start_new_session=True)
    guard = None
    try:
        def members():
            init = [int(p) for p in Path(f"/proc/{tree.pid}/task/{tree.pid}/children").read_text().split()]
            if len(init) != 1:
                return None
            kids = Path(f"/proc/{init[0]}/task/{init[0]}/children").read_text().split()
            return (init[0], [int(k) for k in kids]) if len(kids) == 2 else None

        init, (held, other) = wait_for(members, 30, "the tree in its namespace")
        for pid in (init, held, other):
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: all(_state(p) == "T" for p in (init, held, other)), 30, "the tree to stop")
        r, w = os.pipe()
        guard = subprocess.Popen([sys.executable, "-I", "-S", DUMPGUARD, str(r), str(init),
                                  os.readlink(f"/proc/{init}/ns/pid"), ""], pass_fds=(r,),
                                 stderr=subprocess.PIPE, text=True)
        os.close(r)
        os.write(w, f"H{held};".encode())
        os.close(w)  # the checkpointer dies
        _, err = guard.communicate(timeout=30)
        assert "resumed the tree" in err
        wait_for(lambda: _state(init) != "T" and _state(other) != "T", 30, "the others to run")
        assert _state(held) == "T"
    finally:
        if guard is not None and guard.poll() is None:
            guard.kill()
            guard.wait()
        os.killpg(tree.pid, signal.SIGKILL)  # unshare and its child; the namespace dies with its init
        tree.wait()
