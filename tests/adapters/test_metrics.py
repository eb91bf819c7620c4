"""ckpt_agent.adapters.metrics: lifecycle events become CloudWatch datums with the ClusterName, Queue and InstanceType
dimensions, published in batches through a real HTTP endpoint (moto server); the queue is bounded and drops with a
counter; a CloudWatch that never answers does not slow emit()."""

from __future__ import annotations

import datetime as dt
import time

import boto3
from aws_helpers import FAKE_CREDENTIALS, HangingEndpoint, MotoEndpoint

from ckpt_agent.adapters.metrics import CloudWatchPublisher, cloudwatch_client, datums_for
from ckpt_agent.store import events

INSTANCE = {"instance_id": "i-0123", "instance_type": "r6i.2xlarge"}


def committed(final=False, **kw):
    return {"event": "checkpoint_committed", "time": "2026-12-01T10:00:00Z", "job_id": "42", "node": "spot-dy-1",
            "step": "main", "final": final, "seconds": 8.0, "frozen_seconds": 3.0, "bytes_written": 800_000_000,
            "bytes_new": 120_000_000, **INSTANCE, **kw}


def by_name(datums):
    return {d["MetricName"]: d for d in datums}


def test_checkpoint_committed_datums_and_dimensions():
    d = by_name(datums_for(committed(final=True), "eda", "spot"))
    assert d["CheckpointDuration"]["Value"] == 8.0 and d["CheckpointDuration"]["Unit"] == "Seconds"
    assert d["FrozenTime"]["Value"] == 3.0 and d["CheckpointBytesNew"]["Value"] == 120_000_000
    assert d["StoreBandwidth"]["Value"] == 100_000_000 and d["StoreBandwidth"]["Unit"] == "Bytes/Second"
    assert d["FinalCheckpointInTime"]["Value"] == 1 and "FinalCheckpointLate" not in d
    assert d["CheckpointDuration"]["Dimensions"] == [{"Name": "ClusterName", "Value": "eda"},
                                                     {"Name": "Queue", "Value": "spot"},
                                                     {"Name": "InstanceType", "Value": "r6i.2xlarge"}]
    assert d["CheckpointDuration"]["Timestamp"] == dt.datetime(2026, 12, 1, 10, tzinfo=dt.timezone.utc)


def test_each_lifecycle_fact_has_its_metric():
    def names(**record):
        return sorted(by_name(datums_for({"time": "2026-12-01T10:00:00Z", **record}, "c", "q")))

    assert names(event="checkpoint_failed", final=True, error="criu dump timed out after 95 s") == [
        "CheckpointFailures", "FinalCheckpointLate"]
    assert names(event="checkpoint_failed", final=True, error="no time left before the deadline") == [
        "CheckpointFailures", "FinalCheckpointLate"]
    assert names(event="checkpoint_failed", final=True, error="criu: dump failed (exit 1)") == [
        "CheckpointFailures", "FinalCheckpointFailed"]
    assert names(event="checkpoint_failed", final=False, error="x") == ["CheckpointFailures"]
    assert names(event="notice_received") == ["NoticesReceived"]
    assert names(event="requeued") == ["Requeues"]
    assert names(event="restored", seconds=4.0, fell_back_from=[]) == ["RestoreDuration", "Restores"]
    assert names(event="restored", seconds=4.0, fell_back_from=[7]) == ["RestoreDuration", "RestoreFallbacks",
                                                                        "Restores"]
    assert names(event="restore_failed", error="x") == ["RestoreFailures"]
    assert names(event="segment_started", how="launched", restart_count=2) == ["RestartsFromZero"]
    assert names(event="segment_started", how="launched", restart_count=0) == []
    assert names(event="checkpoint_started") == []


def test_published_through_moto_in_batches(monkeypatch):
    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with MotoEndpoint() as url:
        pub = CloudWatchPublisher(cloudwatch_client("us-east-1", url, 5.0), "CkptTest", "eda", "spot", batch=20)
        events.add_sink(pub)
        try:
            for i in range(25):  # 25 x 5 datums: 7 PutMetricData calls of at most 20
                events.emit(None, "42", "checkpoint_committed", node="spot-dy-1", instance=INSTANCE, step="main",
                            generation=i, final=False, seconds=8.0, frozen_seconds=3.0, bytes_written=8_000,
                            bytes_new=1_000)
            events.emit(None, "42", "notice_received", node="spot-dy-1", instance=INSTANCE)
        finally:
            events.remove_sink(pub)
        assert pub.close(30)
        assert (pub.sent, pub.failures, pub.dropped) == (25 * 5 + 1, 0, 0)
        cw = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=url)
        listed = cw.list_metrics(Namespace="CkptTest")["Metrics"]
        assert {m["MetricName"] for m in listed} == {"CheckpointsCommitted", "CheckpointDuration", "FrozenTime",
                                                    "CheckpointBytesNew", "StoreBandwidth", "NoticesReceived"}
        assert all({d["Name"] for d in m["Dimensions"]} == {"ClusterName", "Queue", "InstanceType"} for m in listed)
        now = dt.datetime.now(dt.timezone.utc)
        stats = cw.get_metric_statistics(
            Namespace="CkptTest", MetricName="CheckpointsCommitted", StartTime=now - dt.timedelta(hours=1),
            EndTime=now + dt.timedelta(hours=1), Period=3600, Statistics=["Sum"],
            Dimensions=[{"Name": "ClusterName", "Value": "eda"}, {"Name": "Queue", "Value": "spot"},
                        {"Name": "InstanceType", "Value": "r6i.2xlarge"}])
        assert sum(p["Sum"] for p in stats["Datapoints"]) == 25


def test_hanging_cloudwatch_neither_blocks_emit_nor_grows_without_bound(monkeypatch):
    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with HangingEndpoint() as hang:
        pub = CloudWatchPublisher(cloudwatch_client("us-east-1", hang.url, 30.0), "CkptTest", "eda", "spot",
                                  max_queue=50, batch=20)
        events.add_sink(pub)
        try:
            events.emit(None, "42", "notice_received", node="n", instance=INSTANCE)
            assert hang.accepted.wait(30)  # the worker is now stuck in a call that will not be answered for 30 s
            t0 = time.monotonic()
            for i in range(100):
                events.emit(None, "42", "checkpoint_committed", node="n", instance=INSTANCE, step="main",
                            generation=i, final=False, seconds=1.0, frozen_seconds=0.5, bytes_written=10,
                            bytes_new=1)
            elapsed = time.monotonic() - t0
        finally:
            events.remove_sink(pub)
        assert elapsed < 5.0, elapsed  # 100 emits; one blocked call would take 30 s
        assert pub.dropped == 100 * 5 - 50 and pub.queue.qsize() == 50
        t0 = time.monotonic()
        assert pub.close(0.5) is False  # gives up at its bound
        assert time.monotonic() - t0 < 5.0


def test_install_sinks_from_config_and_never_fails_the_entry_point(monkeypatch):
    from ckpt_agent.adapters.notify import Notifier
    from ckpt_agent.commands._observe import install_sinks
    from ckpt_agent.node.config import AgentConfig

    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    cfg = AgentConfig(queue="spot")
    assert install_sinks(cfg) == []  # nothing enabled: nothing registered
    cfg.monitoring.metrics, cfg.monitoring.region, cfg.monitoring.cluster = True, "us-east-1", "eda"
    cfg.monitoring.event_bus = "ops"
    sinks = install_sinks(cfg)
    try:
        assert [type(s) for s in sinks] == [CloudWatchPublisher, Notifier]
        assert all(s in events._sinks for s in sinks) and sinks[0].queue_name == "spot"
    finally:
        for s in sinks:
            events.remove_sink(s)
            s.close(0.1)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    cfg.monitoring.region = ""
    assert install_sinks(cfg) == []  # no region anywhere: botocore refuses the client; the job still runs
