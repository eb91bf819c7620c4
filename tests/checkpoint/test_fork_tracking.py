"""Dirty tracking across fork(): a child forked after a checkpoint armed its parent, under the pid of a process that
the checkpoint holds (with other contents at the same addresses), keeps its own memory through a written-only
final checkpoint and a restore. Soft-dirty bits are copied by fork(), so its unwritten pages read as unchanged;
CRIU's patch 0003 dumps every page of a process started since the arming (adapters/softdirty.py). Under userfaultfd
tracking (adapters/uffd.py) the child is simply not armed. Either way its pages must not be taken from the other
process's image."""

from __future__ import annotations

import json

import pytest
from ckpt_helpers import DATA, backstop, run_ckpt, start_ckpt, stop_ckpt_run, wait_for, written_only_here

pytestmark = pytest.mark.criu


def test_a_child_forked_since_the_arming_under_a_checkpointed_pid_keeps_its_memory(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    job = "131"
    argv = ["python3", str(DATA / "runner" / "forktool.py")]
    proc = start_ckpt("run", "--job-id", job, "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o1", err=tmp_path / "e1")
    try:
        wait_for(lambda: (work / "ready").exists(), 60, "the tool to fork its first child")
        first = run_ckpt("checkpoint", "--job-id", job, env=env, timeout=120)  # a periodic one: it arms the tree
        assert first.returncode == 0, first.stderr
        (work / "swap").touch()
        wait_for(lambda: (work / "swapped").exists(), 30, "the second child")
        assert (work / "swapped").read_text().strip() == "same-pid"
        final = run_ckpt("checkpoint", "--job-id", job, "--final", env=env, timeout=120)
        assert final.returncode == 0, final.stderr
        assert proc.wait(timeout=backstop(30)) == 75
    finally:
        stop_ckpt_run(proc, runtime, job)

    stats = json.loads((store / job / "main" / "gen-000002" / "manifest.json").read_text())["manifest"]["stats"]
    if written_only_here():  # the case under test: the final checkpoint took the parent's pages from checkpoint 1
        assert stats.get("pages_unchanged", 0) >= (8 << 20) // 4096, stats

    proc = start_ckpt("run", "--job-id", job, "--", *argv, env=env, cwd=work, out=tmp_path / "o2",
                      err=tmp_path / "e2")
    try:
        wait_for(lambda: "resumed job" in (tmp_path / "e2").read_text(), 60, "the restore")
        (work / "check").touch()
        wait_for(lambda: (work / "checked").exists(), 60, "the second child to check its memory")
        assert (work / "checked").read_text().startswith("intact"), (work / "checked").read_text()
        (work / "stop").touch()
        assert proc.wait(timeout=backstop(60)) == 0
    finally:
        stop_ckpt_run(proc, runtime, job)
