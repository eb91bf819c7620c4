"""Lifecycle events as JSON lines with fixed snake_case keys: appended to the job's events file in the store (the
report and the demo read them) and logged (to the journal when the agent runs under systemd)."""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Callable, Dict, List, Optional

from .store import CheckpointStore, iso, utcnow

log = logging.getLogger("ckpt.events")

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
        try:
            store.append_event(job_id, record)
        except OSError as e:
            log.warning("cannot record event %s for job %s: %s", event, job_id, e.strerror)
    for sink in list(_sinks):
        try:
            sink(record)
        except Exception:  # an observer's bug must not fail the lifecycle step that emitted the event
            log.exception("event sink %r failed on %s", sink, event)
    return record
