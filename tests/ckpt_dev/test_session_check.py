"""The suite's session check (tests/conftest.py): a daemon that a session started and left running fails the run and
is killed; a daemon that ran before the session, or that the session stopped, is not its business."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from ckpt_helpers import REPO

from ckpt_dev import reaper

INNER_CONFTEST = textwrap.dedent(f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("suite_conftest", {str(REPO / "tests" / "conftest.py")!r})
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    pytest_sessionstart = suite.pytest_sessionstart
    pytest_sessionfinish = suite.pytest_sessionfinish
""")


def fake_daemon(directory, name="munged"):
    """`sleep` under a daemon's name: `pgrep -x munged` finds it, as it would find a leaked munged."""
    path = directory / name
    if not path.exists():
        path.symlink_to("/bin/sleep")
    return path


def run_inner_session(tmp_path, body: str) -> subprocess.CompletedProcess:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(inner),
                           "-c", os.devnull, str(inner)], cwd=inner, capture_output=True, text=True, timeout=120)


def test_a_daemon_left_running_fails_the_session_and_is_killed(tmp_path):
    fake = fake_daemon(tmp_path)
    pid_file = tmp_path / "leaked.pid"
    older = subprocess.Popen([str(fake), "600"])  # ran before the inner session: not the inner session's to kill
    try:
        res = run_inner_session(tmp_path, f"""
            import subprocess
            def test_passes_but_leaks():
                leaked = subprocess.Popen([{str(fake)!r}, "600"])
                open({str(pid_file)!r}, "w").write(str(leaked.pid))
        """)
        out = res.stdout + res.stderr
        assert res.returncode == pytest.ExitCode.TESTS_FAILED, out
        assert "1 passed" in out and "daemons left behind by the suite" in out, out
        leaked = int(pid_file.read_text())
        assert f"{leaked} munged: {fake} 600" in out, out
        assert not reaper.alive(leaked), "the session check must kill what it found"
        assert older.poll() is None, "a daemon that ran before the session must be left alone"
    finally:
        older.kill()
        older.wait()


def test_a_session_that_stops_its_daemons_passes(tmp_path):
    fake = fake_daemon(tmp_path)
    res = run_inner_session(tmp_path, f"""
        import subprocess
        def test_stops_what_it_starts():
            child = subprocess.Popen([{str(fake)!r}, "600"])
            child.kill()
            child.wait()
    """)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "daemons left behind" not in out
