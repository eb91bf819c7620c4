"""The node agent against a loopback IMDSv2 server, real `ckpt run` wrappers and real CRIU; Slurm is a recorder
here (the real-cluster path is in test_slurm_e2e.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from ckpt_helpers import DATA, ckpt_env, registered, require_criu, run_ckpt, start_ckpt, wait_for

from ckpt_agent.adapters.imds import ImdsClient, SpotNotice
from ckpt_agent.adapters.slurm import JobNotFound
from ckpt_agent.errors import SlurmError
from ckpt_agent.node.agent import Agent, NoticeHandler
from ckpt_agent.node.config import AgentSettings
from ckpt_agent.node.monitor import InterruptionMonitor
from ckpt_agent.store import events
from ckpt_agent.store.generations import CheckpointStore
from ckpt_dev.imds_server import ImdsServer

TOOLS = DATA / "runner"


class RecordingSlurm:
    def __init__(self, fail_requeue=False):
        self.calls = []
        self.fail_requeue = fail_requeue

    def drain_node(self, node, reason):
        self.calls.append(("drain", node, reason))

    def requeue(self, job_id):
        self.calls.append(("requeue", job_id))
        if self.fail_requeue:
            raise SlurmError("scontrol requeue failed: slurmctld unreachable")

    def job_info(self, job_id):
        raise JobNotFound(f"job {job_id}: unknown to Slurm")  # nothing for the requeue's follow-up to do


@pytest.fixture
def imds():
    with ImdsServer(instance_id="i-0abc", instance_type="r6i.large") as server:
        yield server


def make_agent(imds, runtime, store, slurm, **settings):
    s = AgentSettings(poll_interval=0.2, deadline_margin=settings.pop("deadline_margin", 20), **settings)
    client = ImdsClient(imds.url)
    holder = {}
    handler = NoticeHandler("node1", str(runtime), slurm, CheckpointStore(str(store)), s,
                            instance=lambda: holder["agent"].instance)
    agent = Agent(InterruptionMonitor(client), handler, client, str(runtime), s.poll_interval)
    holder["agent"] = agent
    return agent


@pytest.fixture
def running_agent():
    threads = []

    def start(agent):
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        threads.append((agent, t))
        return agent

    yield start
    for agent, t in threads:
        agent.stop()
        t.join(timeout=10)


@pytest.mark.criu
def test_spot_notice_checkpoints_drains_and_requeues(imds, tmp_path, running_agent):
    require_criu()
    store, runtime = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    env = ckpt_env(store, runtime, SLURMD_NODENAME="node1")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(TOOLS / "appender.py"), "100", "0.05"]
    procs = [start_ckpt("run", "--job-id", job, "--", *argv, env=env, cwd=work,
                        out=tmp_path / f"{job}.out", err=tmp_path / f"{job}.err") for job in ("201",)]
    other = tmp_path / "other"
    other.mkdir()
    procs.append(start_ckpt("run", "--job-id", "202", "--", "python3", str(TOOLS / "sigterm.py"), env=env,
                            cwd=other, out=tmp_path / "202.out", err=tmp_path / "202.err"))
    for job in ("201", "202"):
        wait_for(lambda job=job: registered(runtime, job), 30, f"job {job} to register")
    slurm = RecordingSlurm()
    agent = running_agent(make_agent(imds, runtime, store, slurm))
    wait_for(lambda: (runtime / "instance.json").exists(), 30, "the agent to record the instance's facts")
    assert json.loads((runtime / "instance.json").read_text())["instance_type"] == "r6i.large"
    imds.inject_spot_notice("terminate", seconds_from_now=120)
    assert [p.wait(timeout=60) for p in procs] == [75, 75]
    wait_for(lambda: [c for c in slurm.calls if c[0] == "requeue"] and len(slurm.calls) >= 3, 30, "requeues")
    assert slurm.calls[0][:2] == ("drain", "node1")
    assert "spot interruption" in slurm.calls[0][2]
    assert sorted(c[1] for c in slurm.calls if c[0] == "requeue") == ["201", "202"]
    assert events.WRITER.flush(10)
    records = [json.loads(line) for line in (store / "201" / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in records]
    for kind in ("notice_received", "drained", "checkpoint_committed", "requeued"):
        assert kind in kinds, kinds
    committed = next(e for e in records if e["event"] == "checkpoint_committed")
    assert committed["final"] and committed["reason"] == "spot-interruption" and committed["bytes_written"] > 0
    assert committed["instance_id"] == "i-0abc"
    # the notice is handled once: no second round while it stays published
    time.sleep(1.0)
    assert len([c for c in slurm.calls if c[0] == "drain"]) == 1
    assert agent.instance["instance_id"] == "i-0abc"
    # and the job resumes from that checkpoint
    res = run_ckpt("run", "--job-id", "201", "--", *argv, env=env, cwd=work)
    assert res.returncode == 0, res.stderr
    assert (work / "log.txt").read_text().splitlines() == [f"step {i}" for i in range(100)]


@pytest.mark.criu
def test_rebalance_takes_a_non_final_checkpoint(imds, tmp_path, running_agent):
    require_criu()
    store, runtime = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    env = ckpt_env(store, runtime, SLURMD_NODENAME="node1")
    proc = start_ckpt("run", "--job-id", "203", "--", "python3", str(TOOLS / "sigterm.py"), env=env,
                      cwd=tmp_path, out=tmp_path / "o", err=tmp_path / "e")
    wait_for(lambda: "waiting" in (tmp_path / "o").read_text(), 30, "the tool to start")
    slurm = RecordingSlurm()
    running_agent(make_agent(imds, runtime, store, slurm))
    imds.inject_rebalance()
    wait_for(lambda: list((store / "203" / "main").glob("gen-000001")), 30, "the rebalance checkpoint")
    assert proc.poll() is None, "a rebalance checkpoint must leave the tool running"
    assert slurm.calls == []
    proc.terminate()
    assert proc.wait(timeout=30) == 7


def test_requeue_happens_even_without_time_for_a_checkpoint(imds, tmp_path):
    """Past the deadline, no checkpoint is attempted but the job is still requeued (it resumes from its last
    periodic checkpoint), and a failing requeue is recorded, not fatal."""
    runtime = tmp_path / "run"
    (runtime / "jobs").mkdir(parents=True)
    store = tmp_path / "store"
    store.mkdir()
    (store / "301").mkdir()
    sock = str(runtime / "jobs" / "301.main.sock")
    (runtime / "jobs" / "301.main.json").write_text(  # a live wrapper (this process) whose socket is gone
        json.dumps({"job_id": "301", "step": "main", "uid": 0, "node": "node1", "socket": sock, "pid": os.getpid()}))
    slurm = RecordingSlurm(fail_requeue=True)
    agent = make_agent(imds, runtime, store, slurm, deadline_margin=20)
    notice = SpotNotice("terminate", datetime.now(timezone.utc) + timedelta(seconds=5))  # deadline already passed
    agent.handler.on_spot(notice)
    assert [c[0] for c in slurm.calls] == ["drain", "requeue"]
    assert events.WRITER.flush(10)
    kinds = [json.loads(line)["event"] for line in (store / "301" / "events.jsonl").read_text().splitlines()]
    assert kinds == ["notice_received", "drained", "checkpoint_failed", "requeue_failed"]


def test_imds_errors_never_stop_the_agent(imds, tmp_path, running_agent):
    runtime, store = tmp_path / "run", tmp_path / "store"
    store.mkdir()
    slurm = RecordingSlurm()
    imds.fail_next(8, status=503)
    running_agent(make_agent(imds, runtime, store, slurm))
    time.sleep(1.0)
    imds.inject_spot_notice("stop", seconds_from_now=100)
    wait_for(lambda: slurm.calls, 20, "the agent to act after IMDS recovered")
    assert slurm.calls[0][0] == "drain" and "stop" in slurm.calls[0][2]


class StalledStore(CheckpointStore):
    """A store on a file system that has hung: every event append blocks until the test ends."""

    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()
        self.appends = 0

    def append_event(self, job_id, event):
        self.appends += 1
        self.release.wait(60)


def test_a_hung_store_never_delays_the_drain_or_the_requeue(imds, tmp_path):
    """FSx that hangs (as NFS-like file systems do) must not hold up what has a deadline: the drain, the final
    checkpoints' start and the requeue all happen within 2 s of the notice, and the events are logged."""
    runtime = tmp_path / "run"
    (runtime / "jobs").mkdir(parents=True)
    store = StalledStore(str(tmp_path / "store"))
    for job in ("401", "402"):
        (runtime / "jobs" / f"{job}.main.json").write_text(json.dumps(
            {"job_id": job, "step": "main", "uid": 0, "node": "node1", "pid": os.getpid(),
             "socket": str(runtime / "jobs" / f"{job}.main.sock")}))
    slurm = RecordingSlurm()
    s = AgentSettings(poll_interval=0.2, deadline_margin=20)
    handler = NoticeHandler("node1", str(runtime), slurm, store, s, instance=lambda: {})
    try:
        t0 = time.monotonic()
        handler.on_spot(SpotNotice("terminate", datetime.now(timezone.utc) + timedelta(seconds=120)))
        took = time.monotonic() - t0
        assert [c[0] for c in slurm.calls] == ["drain", "requeue", "requeue"]
        assert took < 2.0, f"the notice took {took:.1f} s with the store hung"
        wait_for(lambda: store.appends >= 1, 30, "the event writer to block in the store, as the test intends")
    finally:
        store.release.set()
        assert events.WRITER.flush(30)


def test_a_registration_under_another_node_name_is_checkpointed_and_logged(imds, tmp_path, caplog):
    """The runtime directory is node-local: a wrapper that registered under the host name (or any other name) is
    a job on this node. The agent says so as an error and still includes it (issue 12, defect 6)."""
    runtime = tmp_path / "run"
    (runtime / "jobs").mkdir(parents=True)
    store = tmp_path / "store"
    store.mkdir()
    sock = str(runtime / "jobs" / "302.main.sock")
    (runtime / "jobs" / "302.main.json").write_text(
        json.dumps({"job_id": "302", "step": "main", "uid": 0, "node": "ip-10-0-1-23", "socket": sock,
                    "pid": os.getpid()}))
    agent = make_agent(imds, runtime, store, RecordingSlurm())
    with caplog.at_level("ERROR", logger="ckpt_agent.node.agent"):
        regs = agent.handler.jobs_here()
    assert [r["job_id"] for r in regs] == ["302"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "'ip-10-0-1-23'" in errors[0] and "'node1'" in errors[0], errors


def test_node_name_comes_from_parallelclusters_file(tmp_path):
    from ckpt_agent.commands.agent import node_name

    name_file = tmp_path / "slurm_nodename"
    name_file.write_text("sim-spot-dy-nodes-3\n")
    assert node_name(None, {}, str(name_file)) == "sim-spot-dy-nodes-3"
    assert node_name("n9", {"SLURMD_NODENAME": "n1"}, str(name_file)) == "n9"
    assert node_name(None, {"SLURMD_NODENAME": "n1"}, str(name_file)) == "n1"
    import socket

    assert node_name(None, {}, str(tmp_path / "missing")) == socket.gethostname()


def test_a_final_that_cannot_fit_is_skipped_and_the_job_requeued_at_once(imds, tmp_path, monkeypatch):
    """The wrapper predicts its final checkpoint from its stats (fake clock and stats here), finds it would not fit
    the time left while its newest periodic checkpoint is recent: it stops the tool without one and answers with
    that checkpoint; the agent requeues the job at once. The tool is a real process, the socket a real one."""
    import subprocess

    from ckpt_agent.checkpoint.engine import JobState
    from ckpt_agent.checkpoint.runner import Runner, RunOptions

    monkeypatch.setenv("SLURMD_NODENAME", "node1")
    runtime, store = tmp_path / "run", tmp_path / "store"
    store.mkdir()

    class NoCheckpoints:  # a final that was tried would fail loudly here
        def checkpoint(self, job, **_kw):
            raise AssertionError("the final checkpoint was attempted")

    runner = Runner(RunOptions(job_id="302", step="main", argv=["sleep"], interval=600, runtime_dir=str(runtime)),
                    CheckpointStore(str(store)), NoCheckpoints())
    runner.store.ensure_job("302", "main")
    now = [5000.0]
    runner.clock = lambda: now[0]
    tool = subprocess.Popen(["sleep", "600"])
    try:
        runner.job = JobState(job_id="302", step="main", init_pid=tool.pid, cwd=str(tmp_path), argv=["sleep"],
                              pipe_inodes={})
        runner._register()
        # a periodic checkpoint (generation 6) 300 s ago; 50 MB changed per second, 100 MB/s to the store
        runner._newest_periodic = {"at": now[0], "generation": 6, "frozen_seconds": 3.0}
        runner.plan_deadline({"frozen_seconds": 3.0, "seconds": 3.0 + 300.0, "bytes_written": 50e6 * 600},
                             since_previous=600)
        now[0] += 300  # predicted: 3 + 50 MB/s * 300 s / 100 MB/s = 153 s, against about 98 s left
        slurm = RecordingSlurm()
        agent = make_agent(imds, runtime, store, slurm, deadline_margin=20)
        agent.handler.on_spot(SpotNotice("terminate", datetime.now(timezone.utc) + timedelta(seconds=120)))
        assert [c[0] for c in slurm.calls] == ["drain", "requeue"] and slurm.calls[1] == ("requeue", "302")
        assert tool.wait(timeout=30) == -9 and runner._stopped_by_final and runner._await_requeue
        assert events.WRITER.flush(10)
        evs = [json.loads(line) for line in (store / "302" / "events.jsonl").read_text().splitlines()]
        kinds = [e["event"] for e in evs]
        assert "checkpoint_started" not in kinds
        assert kinds.index("final_skipped") < kinds.index("requeued"), kinds
        skipped = next(e for e in evs if e["event"] == "final_skipped")
        assert skipped["generation"] == 6 and skipped["predicted_seconds"] == pytest.approx(153)
        assert 90 < skipped["time_left_seconds"] <= 100 and skipped["periodic_age_seconds"] == 300
    finally:
        runner._unregister()
        tool.kill()
        tool.wait()
