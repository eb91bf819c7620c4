"""CloudWatch metrics from lifecycle events: the agent's and the wrapper's `emit()` records become datums, published
in batches by a background thread (sinks.BackgroundSink), so a slow or unreachable CloudWatch never delays a
checkpoint. Dimensions: ClusterName, Queue, InstanceType (every datum carries all three, so the dashboard's
SEARCH expressions find them under one dimension set).

Metrics per event (namespace from the config, default CkptAgent):
  checkpoint_committed  CheckpointDuration, FrozenTime (Seconds), CheckpointBytesNew (Bytes), StoreBandwidth
                        (Bytes/Second: bytes written / checkpoint time), CheckpointsCommitted; a final one also
                        FinalCheckpointInTime, or FinalCheckpointLate when the record says `late`
  checkpoint_failed     CheckpointFailures; a final one also FinalCheckpointLate when the deadline ran out, else
                        FinalCheckpointFailed
  notice_received       NoticesReceived          requeued       Requeues
  restored              Restores, RestoreDuration; RestoreFallbacks when damaged generations were skipped
  restore_failed        RestoreFailures          segment_started (launched on a restart)  RestartsFromZero
Work lost and Spot against On-Demand cost need a whole job's events: the head node's `ckpt report --cloudwatch`
publishes them (report.metric_data) with the same dimension names.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from ckpt_agent.adapters.aws import aws_call, region_of
from ckpt_agent.adapters.sinks import BackgroundSink, client_config
from ckpt_agent.headnode.report import parse_time
from ckpt_agent.store import event_names as ev

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "CkptAgent"


def dimensions(cluster: str, queue: str, instance_type: str) -> List[Dict[str, str]]:
    return [{"Name": "ClusterName", "Value": cluster or "default"}, {"Name": "Queue", "Value": queue or "-"},
            {"Name": "InstanceType", "Value": instance_type or "unknown"}]


def final_late(record: Dict[str, Any]) -> bool:
    error = str(record.get("error") or "").lower()
    return bool(record.get("late")) or "deadline" in error or "timed out" in error or "timeout" in error


def datums_for(record: Dict[str, Any], cluster: str, queue: str) -> List[Dict[str, Any]]:
    """The CloudWatch datums one event record stands for (none for events that are not measured)."""
    kind = record.get("event")
    out: List[tuple] = []  # (name, value, unit)
    final = bool(record.get("final"))
    if kind == ev.CHECKPOINT_COMMITTED:
        seconds = float(record.get("seconds") or 0)
        out += [("CheckpointsCommitted", 1, "Count"), ("CheckpointDuration", seconds, "Seconds"),
                ("FrozenTime", float(record.get("frozen_seconds") or 0), "Seconds"),
                ("CheckpointBytesNew", float(record.get("bytes_new") or 0), "Bytes")]
        if seconds > 0:
            out.append(("StoreBandwidth", float(record.get("bytes_written") or 0) / seconds, "Bytes/Second"))
        if final:
            out.append(("FinalCheckpointLate" if record.get("late") else "FinalCheckpointInTime", 1, "Count"))
    elif kind == ev.CHECKPOINT_FAILED:
        out.append(("CheckpointFailures", 1, "Count"))
        if final:
            out.append(("FinalCheckpointLate" if final_late(record) else "FinalCheckpointFailed", 1, "Count"))
    elif kind == ev.NOTICE_RECEIVED:
        out.append(("NoticesReceived", 1, "Count"))
    elif kind == ev.REQUEUED:
        out.append(("Requeues", 1, "Count"))
    elif kind == ev.RESTORED:
        out += [("Restores", 1, "Count"), ("RestoreDuration", float(record.get("seconds") or 0), "Seconds")]
        if record.get("fell_back_from"):
            out.append(("RestoreFallbacks", 1, "Count"))
    elif kind == ev.RESTORE_FAILED:
        out.append(("RestoreFailures", 1, "Count"))
    elif kind == ev.SEGMENT_STARTED and record.get("how") == "launched" and int(record.get("restart_count") or 0):
        out.append(("RestartsFromZero", 1, "Count"))
    if not out:
        return []
    dims = dimensions(cluster, queue, str(record.get("instance_type") or ""))
    when = parse_time(record.get("time"))
    return [{"MetricName": name, "Dimensions": dims, "Value": float(value), "Unit": unit,
             **({"Timestamp": when} if when else {})} for name, value, unit in out]


class CloudWatchPublisher(BackgroundSink):
    """An events sink: datums queue up and go to PutMetricData in batches (at most 20 per call, one call in flight)."""

    name = "cloudwatch"

    def __init__(self, client: Any, namespace: str, cluster: str, queue: str = "", **kw: Any) -> None:
        self.client = client
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.cluster = cluster
        self.queue_name = queue
        super().__init__(**kw)

    def items(self, record: Dict[str, Any]) -> List[Dict[str, Any]]:
        return datums_for(record, self.cluster, self.queue_name)

    def send(self, batch: List[Dict[str, Any]]) -> None:
        where = f"namespace {self.namespace}"
        with aws_call("CloudWatch", "PutMetricData", region=region_of(self.client), subject=where):
            self.client.put_metric_data(Namespace=self.namespace, MetricData=batch)


def cloudwatch_client(region: str = "", endpoint_url: str = "", timeout: float = 5.0) -> Any:
    import boto3

    kw: Dict[str, Any] = {"config": client_config(timeout)}
    if region:
        kw["region_name"] = region
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return boto3.client("cloudwatch", **kw)


def publisher_from_config(cfg: Any, region: Optional[str] = None) -> CloudWatchPublisher:
    m = cfg.monitoring
    client = cloudwatch_client(region or m.region, m.endpoint_url, m.timeout)
    return CloudWatchPublisher(client, m.namespace, m.cluster, cfg.queue)
