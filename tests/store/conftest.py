"""Fixtures of the store's tests: an empty store in a temporary directory with one job step ready."""

from __future__ import annotations

import pytest

from ckpt_agent.store.generations import CheckpointStore

JOB, STEP = "4242", "main"  # the job step `store` is ready for; test modules name it with their own constants


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    s = CheckpointStore(str(root))
    s.ensure_job(JOB, STEP)
    return s
