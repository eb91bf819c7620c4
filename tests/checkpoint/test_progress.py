"""Progress on long work: ProgressLine's bytes, rate and time left (fake clock); `ckpt checkpoint` of a real job
draws a live line on a terminal (a pty) and prints exactly one summary line when stderr is not a terminal; `ckpt gc
--dry-run` says in total what it would free."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

from ckpt_helpers import ckpt_cmd, ckpt_env, kill_job, registered, require_criu, run_ckpt, start_ckpt, wait_for

from ckpt_agent.checkpoint.progress import DirectoryGrowth, ProgressLine


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def test_rate_and_time_left_on_a_terminal():
    clock, out = Clock(), Tty()
    line = ProgressLine(out, "checkpoint of job 1 step main", total=1000 << 20, clock=clock)
    clock.t += 2
    line.sample(200 << 20)
    assert line.text() == ("checkpoint of job 1 step main: 200.0 MiB of ~1000.0 MiB, 100.0 MiB/s, 0:08 left, "
                           "0:02 elapsed")
    assert out.getvalue().startswith("\rcheckpoint of job 1 step main: 200.0 MiB")
    line.done("summary")
    assert out.getvalue().endswith("\rsummary\n")


def test_nothing_but_the_summary_when_not_a_terminal():
    out = io.StringIO()
    line = ProgressLine(out, "x", total=10)
    line.sample(5)
    line.done("x: generation 3")
    assert out.getvalue() == "x: generation 3\n"


def test_directory_growth(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 100)
    g = DirectoryGrowth(str(tmp_path))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 4096)
    os.symlink("/etc/passwd", tmp_path / "link")
    assert g.grown() == 4096


BIG = "import os,sys,time\nopen('big','wb').write(os.urandom(64<<20))\nprint('ready',flush=True)\ntime.sleep(600)\n"


def test_checkpoint_progress_on_a_terminal_and_a_summary_line_otherwise(tmp_path):
    require_criu()
    root, runtime, work = tmp_path / "store", tmp_path / "run", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    env = ckpt_env(root, runtime)
    proc = start_ckpt("run", "--job-id", "611", "--interval", "1000", "--", sys.executable, "-c", BIG, env=env,
                      cwd=work, out=tmp_path / "out", err=tmp_path / "err")
    try:
        wait_for(lambda: registered(runtime, "611") and b"ready" in (tmp_path / "out").read_bytes(), 60,
                 "the tool to write its data")
        plain = run_ckpt("checkpoint", "--job-id", "611", env=env)
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.strip() == "1"
        lines = plain.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("checkpoint of job 611 step main: generation 1, "), lines
        assert " written in " in lines[0] and "/s" in lines[0]

        master, slave = pty.openpty()
        try:
            res = subprocess.run(ckpt_cmd("checkpoint", "--job-id", "611"), env=env, stdout=subprocess.PIPE,
                                 stderr=slave, timeout=120)
            os.close(slave)
            slave = -1
            shown = b""
            while True:
                try:
                    part = os.read(master, 65536)
                except OSError:  # EIO: the writer has closed
                    break
                if not part:
                    break
                shown += part
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        text = shown.decode(errors="replace")
        assert res.returncode == 0 and res.stdout.strip() == b"2"
        assert "\rcheckpoint of job 611 step main: " in text and "of ~" in text  # live, against the last size
        assert "elapsed" in text
        assert text.rstrip().splitlines()[-1].lstrip("\r ").startswith("checkpoint of job 611 step main: "
                                                                        "generation 2, ")
    finally:
        kill_job(proc, runtime, "611")


def _read_pty(master: int) -> str:
    shown = b""
    while True:
        try:
            part = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed
            break
        if not part:
            break
        shown += part
    return shown.decode(errors="replace")


def test_restore_from_the_command_line_shows_progress_on_a_terminal(tmp_path):
    require_criu()
    root, runtime, work = tmp_path / "store", tmp_path / "run", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    env = ckpt_env(root, runtime)
    tool = "import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.05)\n"
    first = start_ckpt("run", "--job-id", "612", "--interval", "1000", "--", sys.executable, "-c", tool, env=env,
                       cwd=work, out=tmp_path / "out", err=tmp_path / "err")
    try:
        wait_for(lambda: registered(runtime, "612") and b"1\n" in (tmp_path / "out").read_bytes(), 60,
                 "the tool to start")
        assert run_ckpt("checkpoint", "--job-id", "612", "--final", env=env).returncode == 0
        assert first.wait(timeout=60) == 75
    finally:
        if first.poll() is None:
            kill_job(first, runtime, "612")
    master, slave = pty.openpty()
    try:
        res = subprocess.run(ckpt_cmd("run", "--job-id", "612", "--", sys.executable, "-c", tool), env=env,
                             cwd=work, stdout=subprocess.PIPE, stderr=slave, timeout=120)
        os.close(slave)
        slave = -1
        text = _read_pty(master)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert res.returncode == 0, text
    assert "\rrestoring job 612 step main: " in text and "of ~" in text
    assert "ckpt: resumed job 612 step main from checkpoint 1 taken " in text
    assert res.stdout.decode().split()[-1] == "39"
