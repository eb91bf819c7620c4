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
