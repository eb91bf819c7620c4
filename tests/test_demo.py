"""`make demo`'s core, as a newcomer sees it: a real job survives a Spot notice and the demo says so."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ckpt_helpers import REPO, require_criu

pytestmark = [pytest.mark.slurm, pytest.mark.criu, pytest.mark.slow]


def test_demo_moves_the_job_and_matches_an_uninterrupted_run():
    require_criu()
    res = subprocess.run([sys.executable, "-m", "ckpt_agent.demo", "--quick", "--interval", "10"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-2000:]
    for expected in ("received the Spot notice", "FINAL checkpoint", "drained", "job requeued",
                     "restored on node2", "COMPLETED on node2", "result.txt MATCHES", "reads as one uninterrupted run",
                     "ckpt report --job-id", "removed", "SUCCESS"):
        assert expected in out, (expected, out[-3000:])
    assert out.index("FINAL checkpoint") < out.index("job requeued") < out.index("restored on node2")
    leftovers = subprocess.run(["pgrep", "-f", "ckpt-demo-"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"the demo left processes behind: {leftovers}"


def test_ctrl_c_stops_everything_the_demo_started():
    require_criu()
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ckpt_agent.demo", "--quick"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until the job runs on the cluster, then press Ctrl-C
        lines.append(line)
        if "is RUNNING on node1" in line:
            break
    workdir = lines[0].split(" in ")[-1].strip()
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + out
    assert "interrupted" in out and "stopping the cluster" in out
    left = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of {workdir} survived Ctrl-C: {left}"
