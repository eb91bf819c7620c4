"""Lifecycle events as JSON lines with fixed snake_case keys: appended to the job's events file in the store (the
report and the demo read them) and logged (to the journal when the agent runs under systemd).

An event the store cannot take (a full or read-only file system, a vanished job directory) is logged and kept in
memory, at most MAX_UNWRITTEN_EVENTS per job, and written before the job's next event once the store takes writes
again: a `checkpoint_failed` on a full disk reaches events.jsonl, with its own time, when space returns."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any, Dict, List, Optional, Tuple

from .errors import CkptError
from .store import CheckpointStore, iso, utcnow

log = logging.getLogger("ckpt.events")

MAX_UNWRITTEN_EVENTS = 1000  # per job: a few hours of failed periodic checkpoints; older ones are only in the log
_unwritten: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}  # (store root, job id) -> events not yet in the store
_unwritten_lock = threading.Lock()


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
        _append(store, job_id, record)
    return record


def _append(store: CheckpointStore, job_id: str, record: Dict[str, Any]) -> None:
    """Append the job's unwritten events, oldest first, then this one; keep what the store refuses."""
    key = (store.root, job_id)
    with _unwritten_lock:
        failed_before = key in _unwritten  # the failed write may have left half a line
        queue = _unwritten.setdefault(key, [])
        queue.append(record)
        try:
            while queue:
                store.append_event(job_id, queue[0], new_line=failed_before)
                failed_before = False
                queue.pop(0)
        except (OSError, CkptError) as e:
            log.warning("cannot record event %s for job %s (%d kept to retry): %s", record["event"], job_id,
                        len(queue), getattr(e, "strerror", None) or e)
            del queue[:-MAX_UNWRITTEN_EVENTS]
        if not queue:
            del _unwritten[key]
