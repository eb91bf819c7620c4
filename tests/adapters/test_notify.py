"""`notify`: what needs a human reaches an SNS topic or an EventBridge bus (moto server, read back through
SQS subscriptions) as one line with job, user, node and cause; duplicates within the window are suppressed; and an
endpoint that never answers delays neither emit() nor a real final checkpoint of a real `ckpt run`."""

from __future__ import annotations

import json
import os
import pwd
import time

import boto3
from aws_helpers import FAKE_CREDENTIALS, HangingEndpoint, MotoEndpoint
from ckpt_helpers import DATA, ckpt_env, kill_job, registered, require_criu, run_ckpt, start_ckpt, wait_for

from ckpt_agent.adapters.notify import EventBridgeTarget, Notifier, SnsTarget, cause_of, notifier_from_config
from ckpt_agent.adapters.sinks import client_config
from ckpt_agent.node.config import AgentConfig
from ckpt_agent.store import events

INSTANCE = {"instance_id": "i-0abc", "instance_type": "c6i.large"}
ME = pwd.getpwuid(os.getuid()).pw_name


def aws(monkeypatch):
    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)


def sqs_messages(sqs, url, want, timeout=30):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        out = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        got += [m["Body"] for m in out.get("Messages", [])]
    return got


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_causes():
    assert cause_of({"event": "checkpoint_failed", "final": False}) is None
    assert cause_of({"event": "checkpoint_committed", "final": True}) is None
    kind, text = cause_of({"event": "checkpoint_failed", "final": True, "step": "main", "error": "criu: exit 1"})
    assert kind == "final-failed" and "final checkpoint of step main failed: criu: exit 1" in text
    assert cause_of({"event": "checkpoint_failed", "final": True, "error": "no time left before the deadline"})[0] \
        == "final-late"
    assert cause_of({"event": "restored", "generation": 3, "fell_back_from": []}) is None
    kind, text = cause_of({"event": "restored", "generation": 3, "fell_back_from": [4], "step": "main"})
    assert kind == "restore-fallback" and "fell back to checkpoint 3" in text and "4 damaged" in text
    assert cause_of({"event": "restore_failed", "error": "criu restore: exit 1"})[0] == "restore-failed"
    assert cause_of({"event": "segment_started", "how": "launched", "restart_count": 0}) is None
    assert cause_of({"event": "segment_started", "how": "launched", "restart_count": 1, "step": "main"})[0] \
        == "restarted-from-zero"


def test_sns_one_line_per_cause_with_duplicates_suppressed(monkeypatch, tmp_path):
    aws(monkeypatch)
    with MotoEndpoint() as url:
        sns = boto3.client("sns", region_name="us-east-1", endpoint_url=url)
        sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=url)
        topic = sns.create_topic(Name="ckpt-alerts")["TopicArn"]
        q = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        qarn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=qarn, Attributes={"RawMessageDelivery": "true"})

        cfg = AgentConfig(store=str(tmp_path))
        cfg.monitoring.cluster, cfg.monitoring.region = "eda", "us-east-1"
        cfg.monitoring.sns_topic_arn, cfg.monitoring.endpoint_url = topic, url
        (tmp_path / "42").mkdir()  # the job's store directory: its owner is the job's user
        clock = FakeClock()
        notifier = notifier_from_config(cfg)
        notifier.clock = clock
        events.add_sink(notifier)
        try:
            for _ in range(3):  # the same failure three times within the window: one message
                events.emit(None, "42", "checkpoint_failed", node="spot-dy-nodes-3", instance=INSTANCE, step="main",
                            final=True, reason="spot-interruption", error="criu dump timed out after 95 s")
            events.emit(None, "42", "checkpoint_committed", node="spot-dy-nodes-3", instance=INSTANCE, step="main",
                        final=False, seconds=1.0)  # nothing to tell
            events.emit(None, "42", "restored", node="spot-dy-nodes-5", instance=INSTANCE, step="main",
                        generation=2, fell_back_from=[3])
            clock.t += 3601  # the window has passed: the same cause is news again
            events.emit(None, "42", "checkpoint_failed", node="spot-dy-nodes-5", instance=INSTANCE, step="main",
                        final=True, error="criu dump timed out after 95 s")
        finally:
            events.remove_sink(notifier)
        assert notifier.close(30) and notifier.failures == 0
        assert notifier.suppressed == 2
        got = sqs_messages(sqs, q, 3)
        assert len(got) == 3, got
        assert all("\n" not in m for m in got)
        first = next(m for m in got if "spot-dy-nodes-3" in m)
        assert first.startswith("ckpt [eda]: job 42 (user " + ME + ") on node spot-dy-nodes-3 (c6i.large, i-0abc)")
        assert first.endswith("final checkpoint of step main was late: criu dump timed out after 95 s; the job "
                              "resumes from its last periodic checkpoint")
        assert any("restore of step main fell back to checkpoint 2" in m for m in got)


def test_eventbridge_bus_gets_a_structured_event(monkeypatch):
    aws(monkeypatch)
    with MotoEndpoint() as url:
        ev = boto3.client("events", region_name="us-east-1", endpoint_url=url)
        sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=url)
        ev.create_event_bus(Name="ops")
        q = sqs.create_queue(QueueName="ops-inbox")["QueueUrl"]
        qarn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        ev.put_rule(Name="ckpt", EventBusName="ops", EventPattern=json.dumps({"source": ["ckpt-agent"]}))
        ev.put_targets(Rule="ckpt", EventBusName="ops", Targets=[{"Id": "q", "Arn": qarn}])
        notifier = Notifier(EventBridgeTarget(ev, "ops"), "eda", user_of=lambda job: "alice")
        events.add_sink(notifier)
        try:
            events.emit(None, "77", "segment_started", node="spot-dy-nodes-1", instance=INSTANCE, step="main",
                        how="launched", restart_count=2)
        finally:
            events.remove_sink(notifier)
        assert notifier.close(30) and notifier.failures == 0
        (body,) = sqs_messages(sqs, q, 1)
        detail = json.loads(body)["detail"]
        assert detail["kind"] == "restarted-from-zero" and detail["job_id"] == "77"
        assert detail["message"].startswith("ckpt [eda]: job 77 (user alice) on node spot-dy-nodes-1")
        assert "restarted from zero after 2 restart(s)" in detail["message"]


def test_unanswered_endpoint_does_not_delay_emit(monkeypatch):
    aws(monkeypatch)
    with HangingEndpoint() as hang:
        sns = boto3.client("sns", region_name="us-east-1", endpoint_url=hang.url, config=client_config(30.0))
        notifier = Notifier(SnsTarget(sns, "arn:aws:sns:us-east-1:123456789012:t"), "eda", window=0,
                            user_of=lambda job: "alice", max_queue=10)
        events.add_sink(notifier)
        try:
            t0 = time.monotonic()
            events.emit(None, "1", "restore_failed", node="n", instance=INSTANCE, step="main", error="x")
            first = time.monotonic() - t0
            assert hang.accepted.wait(30)  # the publisher is stuck in a call that is not answered for 30 s
            t0 = time.monotonic()
            for i in range(50):
                events.emit(None, str(i), "restore_failed", node="n", instance=INSTANCE, step="main", error="x")
            many = time.monotonic() - t0
        finally:
            events.remove_sink(notifier)
        assert first < 5.0 and many < 5.0, (first, many)
        assert notifier.dropped == 40
        notifier.close(0.2)


def test_real_final_checkpoint_completes_while_the_endpoints_hang(tmp_path):
    """A `ckpt run` whose config sends metrics and notifications to an endpoint that never answers: the wrapper's
    publisher is stuck from the start (a restart from zero is notified at launch); a final checkpoint still completes
    and the wrapper exits 75, bounded by its exit flush, not by the 60 s call timeout."""
    require_criu()
    root, runtime, work = tmp_path / "store", tmp_path / "run", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    with HangingEndpoint() as hang:
        config = tmp_path / "observe.yaml"
        config.write_text(
            "monitoring:\n  cluster: eda\n  region: us-east-1\n  metrics: true\n"
            f"  sns_topic_arn: arn:aws:sns:us-east-1:123456789012:ckpt\n  endpoint_url: {hang.url}\n"
            "  timeout: 60\n" + _key_line(tmp_path))
        env = ckpt_env(root, runtime, CKPT_CONFIG=str(config), SLURM_RESTART_COUNT="1", **FAKE_CREDENTIALS)
        argv = ["python3", str(DATA / "runner" / "appender.py"), "60", "0.1"]
        proc = start_ckpt("run", "--job-id", "901", "--interval", "1000", "--", *argv, env=env, cwd=work,
                          out=tmp_path / "out", err=tmp_path / "err")
        try:
            wait_for(lambda: registered(runtime, "901"), 60, "the wrapper to register")
            assert hang.accepted.wait(60), "the wrapper never tried to publish"
            res = run_ckpt("checkpoint", "--job-id", "901", "--final", env=env, timeout=120)
            assert res.returncode == 0, res.stderr
            assert all(c.fileno() >= 0 for c in hang.conns)  # still holding the unanswered requests
            t0 = time.monotonic()
            assert proc.wait(timeout=40) == 75
            assert time.monotonic() - t0 < 30  # the exit flush is bounded (3 s), the call timeout is 60 s
        finally:
            if proc.poll() is None:
                kill_job(proc, runtime, "901")
    evs = [json.loads(line)["event"] for line in (root / "901" / "events.jsonl").read_text().splitlines()]
    assert "checkpoint_committed" in evs and evs[-1] == "segment_ended"


def test_real_run_restarted_from_zero_notifies_and_publishes(monkeypatch, tmp_path):
    """The wiring end to end: a requeued job (SLURM_RESTART_COUNT=1) that finds no checkpoint starts from zero; its
    `ckpt run` wrapper, configured by agent.yaml's monitoring section, tells SNS (read back through SQS) and puts
    RestartsFromZero and the checkpoint metrics in CloudWatch before it exits."""
    require_criu()
    aws(monkeypatch)
    root, runtime, work = tmp_path / "store", tmp_path / "run", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    with MotoEndpoint() as url:
        sns = boto3.client("sns", region_name="us-east-1", endpoint_url=url)
        sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=url)
        topic = sns.create_topic(Name="ckpt")["TopicArn"]
        q = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        qarn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=qarn, Attributes={"RawMessageDelivery": "true"})
        config = tmp_path / "observe.yaml"
        config.write_text(f"queue: spot\nmonitoring:\n  cluster: eda\n  region: us-east-1\n  metrics: true\n"
                          f"  namespace: CkptE2E\n  sns_topic_arn: {topic}\n  endpoint_url: {url}\n"
                          + _key_line(tmp_path))
        env = ckpt_env(root, runtime, CKPT_CONFIG=str(config), SLURM_RESTART_COUNT="1", **FAKE_CREDENTIALS)
        tool = "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.05)\n"
        res = run_ckpt("run", "--job-id", "902", "--interval", "1", "--", "python3", "-c", tool, env=env, cwd=work)
        assert res.returncode == 0, res.stderr
        (line,) = sqs_messages(sqs, q, 1)
        assert line.startswith(f"ckpt [eda]: job 902 (user {ME}) on node ")
        assert line.endswith("step main restarted from zero after 1 restart(s): no checkpoint to resume from")
        cw = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=url)
        names = {m["MetricName"] for m in cw.list_metrics(Namespace="CkptE2E")["Metrics"]}
        assert "RestartsFromZero" in names
        queues = {d["Value"] for m in cw.list_metrics(Namespace="CkptE2E")["Metrics"] for d in m["Dimensions"]
                  if d["Name"] == "Queue"}
        assert queues == {"spot"}


def _key_line(tmp_path) -> str:
    """The signing key in the test's tmp dir: root's `ckpt run` creates one at first use, never in this machine's
    /etc."""
    return f"agent:\n  key_file: {tmp_path / 'secret' / 'node.key'}\n"
