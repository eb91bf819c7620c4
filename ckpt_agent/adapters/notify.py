"""Notifications for what needs a human, to an SNS topic or an EventBridge bus named in the site file.

What is notified (one readable line each, with job, user, node and cause):
  - a final checkpoint that failed, or was late (the deadline before the reclaim ran out);
  - a restore that fell back to an older generation (the newest was damaged), or failed;
  - a job restarted from zero (a requeued job that found no checkpoint to resume from).
The same job and cause is notified once per `window` seconds (a job whose steps all fail says so once).

`Notifier` is an events sink (sinks.BackgroundSink): deciding is local and immediate, publishing happens in the
background with a per-call timeout, so an unreachable endpoint never delays a checkpoint. The targets are small
classes around a boto3 client: `SnsTarget(client, topic_arn)`, `EventBridgeTarget(client, bus)`.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ckpt_agent.adapters.aws import aws_call, region_of
from ckpt_agent.adapters.sinks import BackgroundSink, client_config
from ckpt_agent.store import event_names as ev

log = logging.getLogger(__name__)

SOURCE = "ckpt-agent"
DETAIL_TYPE = "ckpt-agent notification"


def cause_of(record: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(kind, cause) when the record needs a human, else None."""
    kind = record.get("event")
    step = record.get("step")
    where = f" of step {step}" if step else ""
    if kind == ev.CHECKPOINT_FAILED and record.get("final"):
        from ckpt_agent.adapters.metrics import final_late

        late = final_late(record)
        why = record.get("error") or "no reason given"
        return ("final-late" if late else "final-failed",
                f"final checkpoint{where} {'was late' if late else 'failed'}: {why}; "
                "the job resumes from its last periodic checkpoint")
    if kind == ev.CHECKPOINT_COMMITTED and record.get("final") and record.get("late"):
        return "final-late", f"final checkpoint{where} committed after the deadline"
    if kind == ev.RESTORED and record.get("fell_back_from"):
        skipped = ", ".join(str(g) for g in record["fell_back_from"])
        return ("restore-fallback", f"restore{where} fell back to checkpoint {record.get('generation')}: "
                                    f"newer checkpoint(s) {skipped} damaged")
    if kind == ev.RESTORE_FAILED:
        return "restore-failed", f"restore{where} failed: {record.get('error') or 'no reason given'}"
    if kind == ev.SEGMENT_STARTED and record.get("how") == "launched" and int(record.get("restart_count") or 0):
        return ("restarted-from-zero", f"step {step or '?'} restarted from zero after "
                                       f"{record.get('restart_count')} restart(s): no checkpoint to resume from")
    return None


def owner_of(store_root: str) -> Callable[[str], str]:
    """The user a job belongs to: its store directory's owner (the wrapper creates it as the job's user)."""

    def user(job_id: str) -> str:
        uid = None
        if store_root:
            try:
                uid = os.stat(os.path.join(store_root, job_id)).st_uid
            except OSError:
                uid = None
        if uid is None:
            uid = os.getuid()
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    return user


def message_line(record: Dict[str, Any], cause: str, user: str, cluster: str) -> str:
    return (f"ckpt [{cluster or 'cluster'}]: job {record.get('job_id') or '?'} (user {user}) on node "
            f"{record.get('node') or '?'} ({record.get('instance_type') or 'unknown type'}"
            f"{', ' + record['instance_id'] if record.get('instance_id') else ''}) at {record.get('time')}: {cause}")


class Notifier(BackgroundSink):
    name = "notify"

    def __init__(self, target: Any, cluster: str, window: float = 3600, user_of: Callable[[str], str] = None,
                 clock: Callable[[], float] = time.monotonic, **kw: Any) -> None:
        self.target = target
        self.cluster = cluster
        self.window = window
        self.user_of = user_of or owner_of("")
        self._seen: Dict[Tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.suppressed = 0
        super().__init__(batch=10, clock=clock, **kw)

    def items(self, record: Dict[str, Any]) -> List[Tuple[Dict[str, Any], str, str]]:
        found = cause_of(record)
        if found is None:
            return []
        kind, cause = found
        key = (str(record.get("job_id") or ""), kind)
        now = self.clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self.window:
                self.suppressed += 1
                return []
            self._seen[key] = now
            if len(self._seen) > 10_000:  # forget the oldest: the window bounds what matters
                for k, _ in sorted(self._seen.items(), key=lambda kv: kv[1])[:5_000]:
                    del self._seen[k]
        return [(record, kind, cause)]

    def send(self, batch: List[Tuple[Dict[str, Any], str, str]]) -> None:
        for record, kind, cause in batch:  # the user lookup touches the store: here, never in the caller
            line = message_line(record, cause, self.user_of(str(record.get("job_id") or "")), self.cluster)
            self.target.publish(line, {"kind": kind, "cluster": self.cluster, "job_id": record.get("job_id"),
                                       "step": record.get("step"), "node": record.get("node"),
                                       "instance_type": record.get("instance_type"), "event": record.get("event"),
                                       "time": record.get("time"), "message": line})


class SnsTarget:
    def __init__(self, client: Any, topic_arn: str) -> None:
        self.client = client
        self.topic_arn = topic_arn

    def publish(self, line: str, detail: Dict[str, Any]) -> None:
        subject = f"ckpt: {detail['kind']} job {detail.get('job_id')}"[:100]
        with aws_call("SNS", "Publish", region=region_of(self.client), subject=self.topic_arn):
            self.client.publish(TopicArn=self.topic_arn, Subject=subject, Message=line)


class EventBridgeTarget:
    def __init__(self, client: Any, bus: str) -> None:
        self.client = client
        self.bus = bus

    def publish(self, line: str, detail: Dict[str, Any]) -> None:
        with aws_call("EventBridge", "PutEvents", region=region_of(self.client), subject=f"bus {self.bus}"):
            out = self.client.put_events(Entries=[{"Source": SOURCE, "DetailType": DETAIL_TYPE,
                                                   "Detail": json.dumps(detail), "EventBusName": self.bus}])
        if out.get("FailedEntryCount"):
            raise RuntimeError(f"EventBridge {self.bus} refused the event: {out.get('Entries')}")


def _client(service: str, region: str, endpoint_url: str, timeout: float) -> Any:
    import boto3

    kw: Dict[str, Any] = {"config": client_config(timeout)}
    if region:
        kw["region_name"] = region
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return boto3.client(service, **kw)


def notifier_from_config(cfg: Any) -> Optional[Notifier]:
    """A Notifier for the configured topic or bus; None when neither is set."""
    m = cfg.monitoring
    if m.sns_topic_arn:
        target: Any = SnsTarget(_client("sns", m.region, m.endpoint_url, m.timeout), m.sns_topic_arn)
    elif m.event_bus:
        target = EventBridgeTarget(_client("events", m.region, m.endpoint_url, m.timeout), m.event_bus)
    else:
        return None
    return Notifier(target, m.cluster, m.dedupe_window, user_of=owner_of(cfg.store))
