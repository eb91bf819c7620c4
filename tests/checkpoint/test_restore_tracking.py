"""A restored tree is armed for dirty tracking before it runs (engine._track_restored, adapters/uffd.py), with real
CRIU: its first checkpoint sends only the pages written since the restore, and a restore from that checkpoint gives
the tool exactly its memory back, also the signal frames the kernel wrote between the restore and the tree's stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from ckpt_helpers import (
    DATA,
    backstop,
    restore_page_tool_and_check,
    run_ckpt,
    start_ckpt,
    stop_ckpt_run,
    wait_for,
    whole_huge_pages_tracked,
    written_only_here,
)

pytestmark = pytest.mark.criu
TOOLS = DATA / "runner"


@pytest.fixture(autouse=True)
def _tracking_here():
    if not written_only_here():
        pytest.skip("needs dirty tracking (adapters/uffd.py: Linux >= 6.13 on x86_64) and CRIU's patch 0002")


def _manifest(store: Path, job: str, n: int) -> dict:
    return json.loads((store / job / "main" / f"gen-{n:06d}" / "manifest.json").read_text())["manifest"]


def _run_until_final(env, tmp_path: Path, work: Path, job: str, argv, n: int, before_final) -> None:
    """`ckpt run` (launching or restoring), `before_final(stderr file)`, then a final checkpoint: exit 75."""
    err = tmp_path / f"e{n}"
    proc = start_ckpt("run", "--job-id", job, "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / f"o{n}", err=err)
    try:
        before_final(err)
        final = run_ckpt("checkpoint", "--job-id", job, "--final", env=env, timeout=120)
        assert final.returncode == 0, final.stderr
        assert proc.wait(timeout=backstop(30)) == 75
    finally:
        stop_ckpt_run(proc, Path(env["CKPT_RUNTIME_DIR"]), job)


def _resumed(err: Path) -> None:
    wait_for(lambda: "resumed job" in err.read_text(), 60, "the restore")


def test_the_first_checkpoint_after_a_restore_sends_only_the_pages_written_since(ck, tmp_path):
    env, store, _runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    job = "124"
    argv = ["python3", str(TOOLS / "pagetool.py"), "64", "5"]
    _run_until_final(env, tmp_path, work, job, argv, 1,
                     lambda err: wait_for(lambda: (work / "ready").exists(), 60, "the tool to fill its memory"))

    def restored_then_mutated(err: Path) -> None:
        _resumed(err)
        (work / "mutate").touch()
        wait_for(lambda: (work / "mutated").exists(), 30, "the tool to change 5% of its pages")

    _run_until_final(env, tmp_path, work, job, argv, 2, restored_then_mutated)
    assert "from checkpoint 1 taken" in (tmp_path / "e2").read_text()
    # 5% of 16384 pages rewritten and a new 1 MiB buffer: the rest is taken from checkpoint 1, not sent by CRIU
    # (soft-dirty marks a whole 2 MiB huge page written at a write to any of its pages, and the restored tool has its
    # huge pages back with CRIU's patch 0005: a change at random places then touches nearly all of them, and what is
    # stored is kept small by content instead)
    first, second = _manifest(store, job, 1), _manifest(store, job, 2)
    assert second["stats"].get("pages_unchanged", 0) >= 0.9 * 16384 or whole_huge_pages_tracked(), second["stats"]
    assert second["stats"]["bytes_written"] <= 0.12 * first["stats"]["bytes_written"], second["stats"]

    restore_page_tool_and_check(job, argv, env, work, tmp_path / "o3", tmp_path / "e3")
    assert "from checkpoint 2 taken" in (tmp_path / "e3").read_text()


SIGFRAME_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def _tool_pid(work: Path, comm: str) -> int:
    for entry in os.listdir("/proc"):
        try:
            if (entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == comm
                    and os.readlink(f"/proc/{entry}/cwd") == str(work)):
                return int(entry)
        except OSError:
            continue
    return 0


def _pending(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    return 0


def test_signal_frames_written_before_the_restored_tree_stops_are_kept_by_its_next_checkpoint(ck, tmp_path):
    """Six handled signals pending at a restore are delivered before CRIU's SIGSTOP, so the kernel writes their frames
    before the tree is armed (data/runner/sigframes.c). The tool was stopped when checkpointed, so it is restored
    stopped; the test sends it SIGCONT. The next checkpoint is taken while the innermost handler waits and is
    written-only; after a restore from it, every handler must return through an intact frame. Without the
    span above each stack pointer reading as written (uffd.SIGNAL_FRAMES_SPAN), the outer frames, not written since
    the arming, were taken from the previous checkpoint, which has no frames there: the tool died or saw them
    changed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("needs a C compiler (make setup installs one to build CRIU)")
    env, store, _runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    tool = tmp_path / "sigframes"
    subprocess.run([cc, "-O1", "-o", str(tool), str(TOOLS / "sigframes.c")], check=True, timeout=backstop(120))
    job = "125"

    def stopped_with_signals_pending(err: Path) -> None:
        wait_for(lambda: (work / "ready").exists(), 60, "the tool to fill its memory")
        pid = wait_for(lambda: _tool_pid(work, "sigframes"), 30, "the tool's pid")
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 30,
                 "the tool to stop")
        for sig in SIGFRAME_SIGNALS:
            os.kill(pid, sig)
        want = sum(1 << (s - 1) for s in SIGFRAME_SIGNALS)
        wait_for(lambda: _pending(pid) & want == want, 30, "the signals to be pending")

    _run_until_final(env, tmp_path, work, job, [str(tool)], 1, stopped_with_signals_pending)

    def inside_the_handlers(err: Path) -> None:
        _resumed(err)
        # it was stopped when checkpointed, so it is restored stopped (the engine sends the others SIGCONT): its
        # frames are written by now, and whoever stopped it lets it go on
        os.kill(wait_for(lambda: _tool_pid(work, "sigframes"), 30, "the tool's pid"), signal.SIGCONT)
        wait_for(lambda: (work / "inside").exists(), 30, "the innermost handler")

    _run_until_final(env, tmp_path, work, job, [str(tool)], 2, inside_the_handlers)
    assert _manifest(store, job, 2)["stats"].get("pages_unchanged", 0) > 1000  # written-only: the case under test

    proc = start_ckpt("run", "--job-id", job, "--", str(tool), env=env, cwd=work, out=tmp_path / "o3",
                      err=tmp_path / "e3")
    try:
        _resumed(tmp_path / "e3")
        (work / "leave").touch()
        (work / "stop").touch()
        code = proc.wait(timeout=backstop(60))
    finally:
        stop_ckpt_run(proc, Path(env["CKPT_RUNTIME_DIR"]), job)
    out = (tmp_path / "o3").read_text()
    assert code == 0 and "entered=6 left=6 bad_words=0 badframe=0" in out, (code, out, (tmp_path / "e3").read_text())
