"""The tests' own safety nets: backstop() and what uses it (scripts/kernel-vm-check.sh scales them in emulated
guests, where a step takes 10-40x what it takes here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ckpt_helpers import BACKSTOP_SCALE_ENV, REPO, backstop, wait_for


def test_a_backstop_is_the_step_s_own_without_a_scale(monkeypatch):
    monkeypatch.delenv(BACKSTOP_SCALE_ENV, raising=False)
    assert backstop(30) == 30
    monkeypatch.setenv(BACKSTOP_SCALE_ENV, "")
    assert backstop(30) == 30


def test_a_backstop_is_multiplied_by_the_scale(monkeypatch):
    monkeypatch.setenv(BACKSTOP_SCALE_ENV, "4")
    assert backstop(30) == 120
    monkeypatch.setenv(BACKSTOP_SCALE_ENV, "1.5")
    assert backstop(60) == 90


@pytest.mark.parametrize("raw", ["0.5", "0", "-2", "four", "nan"])
def test_a_scale_that_would_shorten_or_is_no_number_is_refused(monkeypatch, raw):
    monkeypatch.setenv(BACKSTOP_SCALE_ENV, raw)
    with pytest.raises(pytest.UsageError, match=f"{BACKSTOP_SCALE_ENV}='{raw}': must be a number of at least 1"):
        backstop(30)


def test_wait_for_fails_after_the_scaled_backstop_and_says_so(monkeypatch):
    monkeypatch.setenv(BACKSTOP_SCALE_ENV, "3")
    calls = []
    with pytest.raises(AssertionError, match=r"timed out after 0\.03 s waiting for nothing"):
        wait_for(lambda: calls.append(1), 0.01, "nothing", interval=0.001)
    assert calls, "the predicate was polled"


def test_wait_for_returns_the_predicate_s_first_true_value(monkeypatch):
    monkeypatch.setenv(BACKSTOP_SCALE_ENV, "4")
    values = iter([0, None, "ready"])
    assert wait_for(lambda: next(values), 1, "a value", interval=0.001) == "ready"


def test_a_session_with_a_malformed_scale_stops_before_any_test_in_one_line():
    env = dict(os.environ, **{BACKSTOP_SCALE_ENV: "slow"})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--co",
                           str(REPO / "tests" / "test_errors.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert f"{BACKSTOP_SCALE_ENV}='slow': must be a number of at least 1" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
