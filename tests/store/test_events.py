"""Lifecycle events reach the job's events file even when the store refused them at first (a full disk)."""

from __future__ import annotations

import json

from ckpt_agent.store import events
from ckpt_agent.store.generations import CheckpointStore


def test_events_the_store_refuses_are_kept_and_written_in_order_once_it_takes_writes(tmp_path):
    store = CheckpointStore(str(tmp_path))
    events.emit(store, "4001", "checkpoint_failed", error="No space left on device")  # no job directory yet
    assert events.WRITER.flush()
    assert (store.root, "4001") in events.WRITER.unwritten
    path = tmp_path / "4001" / "events.jsonl"
    (tmp_path / "4001").mkdir()
    path.write_text('{"event":"torn li')  # what a short write on a full disk leaves
    events.emit(store, "4001", "checkpoint_committed", generation=2)
    assert events.WRITER.flush()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"event":"torn li'
    assert [json.loads(x)["event"] for x in lines[1:]] == ["checkpoint_failed", "checkpoint_committed"]
    assert [e["event"] for e in store.events("4001")] == ["checkpoint_failed", "checkpoint_committed"]
    assert not events.WRITER.unwritten


def test_unwritten_events_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "MAX_UNWRITTEN_EVENTS", 3)
    store = CheckpointStore(str(tmp_path))
    for i in range(5):
        events.emit(store, "4002", "checkpoint_failed", attempt=i)
    assert events.WRITER.flush()
    assert [e["attempt"] for e in events.WRITER.unwritten[(store.root, "4002")]] == [2, 3, 4]
    (tmp_path / "4002").mkdir()
    events.emit(store, "4002", "checkpoint_committed")
    assert events.WRITER.flush()
    assert [e.get("attempt") for e in store.events("4002")] == [2, 3, 4, None]
