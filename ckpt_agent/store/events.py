"""Lifecycle events as JSON lines with fixed snake_case keys: logged at once (to the journal when the agent runs
under systemd), then appended to the job's events file in the store (the report and the demo read them) by a
background writer, so that a slow or hung store never delays what has a deadline.

An event the store refuses (a full or read-only file system, a vanished job directory) is kept, at most
MAX_UNWRITTEN_EVENTS per job, and written before the job's next event once the store takes writes again: a
`checkpoint_failed` on a full disk reaches events.jsonl, with its own time, when space returns."""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ckpt_agent.errors import CkptError
from ckpt_agent.store.generations import CheckpointStore, iso, utcnow

log = logging.getLogger("ckpt.events")

MAX_UNWRITTEN_EVENTS = 1000  # per job: hours of failed periodic checkpoints; older ones are in the log only

# Observers of every record (CloudWatch metrics, notifications): each must return at once (queue and go), so that
# no external system ever delays or fails the checkpoint that emitted the event. See sinks.py.
Sink = Callable[[Dict[str, Any]], None]
_sinks: List[Sink] = []


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def load_instance(runtime_dir: str) -> Dict[str, Any]:
    """Instance facts (id, type, zone) the node agent wrote from IMDS; empty off EC2 or before the agent ran."""
    try:
        with open(os.path.join(runtime_dir, "instance.json"), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def emit(
    store: Optional[CheckpointStore],
    job_id: str,
    event: str,
    *,
    node: str = "",
    instance: Optional[Dict[str, Any]] = None,
    **fields: Any,
) -> Dict[str, Any]:
    record = {"event": event, "time": iso(utcnow()), "job_id": job_id, "node": node or node_name()}
    inst = instance or {}
    record["instance_id"] = inst.get("instance_id", "")
    record["instance_type"] = inst.get("instance_type", "")
    record.update(fields)
    log.info("%s", json.dumps(record, sort_keys=True))
    if store is not None and job_id:
        WRITER.submit(store, job_id, record)
    for sink in list(_sinks):
        try:
            sink(record)
        except Exception:  # an observer's bug must not fail the lifecycle step that emitted the event
            log.exception("event sink %r failed on %s", sink, event)
    return record


class EventWriter:
    """Appends events to the store (FSx, which can hang like any network file system) from one background thread,
    so that nothing with a deadline (a drain, a final checkpoint's start, a requeue) ever waits for it. The queue is
    bounded: when the store stalls and it fills, further events are dropped and counted (they are in the log
    already). One thread keeps each process's events in order."""

    def __init__(self, max_queued: int = 10000):
        self._queue: queue.Queue[Tuple[Any, str, Dict[str, Any]]] = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.dropped = 0
        # (store root, job id) -> events the store refused, oldest first (touched by the writer thread only)
        self.unwritten: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}

    def submit(self, store: Any, job_id: str, record: Dict[str, Any]) -> bool:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((store, job_id, record))
            return True
        except queue.Full:
            with self._lock:
                self.dropped += 1
                dropped = self.dropped
            if dropped == 1 or dropped % 100 == 0:
                log.warning("the checkpoint store is not keeping up: %d event(s) not recorded in it so far "
                            "(they are in this log)", dropped)
            return False

    def _run(self) -> None:
        while True:
            store, job_id, record = self._queue.get()
            try:
                self._append(store, job_id, record)
            finally:
                self._queue.task_done()

    def _append(self, store: Any, job_id: str, record: Dict[str, Any]) -> None:
        """Append the job's refused events, oldest first, then this one; keep what the store refuses again."""
        key = (store.root, job_id)
        failed_before = key in self.unwritten  # the failed write may have left half a line
        pending = self.unwritten.setdefault(key, [])
        pending.append(record)
        try:
            while pending:
                if failed_before:
                    store.append_event(job_id, pending[0], new_line=True)
                else:
                    store.append_event(job_id, pending[0])
                failed_before = False
                pending.pop(0)
        except (OSError, CkptError) as e:
            log.warning("cannot record event %s for job %s (%d kept to retry): %s", record.get("event"), job_id,
                        len(pending), getattr(e, "strerror", None) or e)
            del pending[:-MAX_UNWRITTEN_EVENTS]
        except Exception:  # a bug must not end the writer: every later event would be lost
            log.exception("cannot record event %s for job %s", record.get("event"), job_id)
            pending.clear()
        if not pending:
            del self.unwritten[key]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most `timeout`) until every submitted event was written or failed; False when the store is too
        slow. Called at exit, so a short-lived command's events reach the store unless it hangs."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True


WRITER = EventWriter()
atexit.register(WRITER.flush, 10.0)
