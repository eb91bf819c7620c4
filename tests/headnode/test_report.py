"""`report` and `ckpt report`: segments, work lost, net vs wall-clock runtime and Spot savings computed
from recorded events (crafted files with known times, and a real interrupted-and-resumed `ckpt run`), the text and
JSON outputs, CloudWatch metrics with moto, and the CLI's exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time

import boto3
import pytest
from ckpt_helpers import DATA, ckpt_env, kill_job, registered, require_criu, run_ckpt, start_ckpt, wait_for
from moto import mock_aws

from ckpt_agent import cli
from ckpt_agent.errors import EXIT_NOT_FOUND, EXIT_USAGE
from ckpt_agent.headnode.report import build_report, load_job_events, parse_time, put_metrics, render_text
from ckpt_agent.store.generations import CheckpointStore

REPORT_DATA = DATA / "report"
PRICES = {"c6i.large": {"spot": 0.03, "ondemand": 0.085}, "m6i.large": {"spot": 0.04, "ondemand": 0.096}}
UTC = dt.timezone.utc


def t(text):
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    for job in ("5001", "5002", "5003"):
        (root / job).mkdir()
        shutil.copy(REPORT_DATA / f"{job}.events.jsonl", root / job / "events.jsonl")
    return CheckpointStore(str(root))


def report_for(store, facts=None, since=None, now="2026-11-04T09:00:00"):
    return build_report(load_job_events(store), PRICES, since=since, now=t(now),
                        slurm_facts=(lambda j: facts.get(j, {})) if facts else None)


def job(report, job_id):
    return next(j for j in report["jobs"] if j["job_id"] == job_id)


def test_interrupted_with_final_checkpoint_then_completed(store):
    r = job(report_for(store), "5001")
    seg1, seg2 = r["steps"][0]["segments"]
    assert (seg1["node"], seg1["instance_id"], seg1["instance_type"]) == ("node1", "i-0aaa000000000001", "c6i.large")
    assert (seg1["start"], seg1["end"], seg1["ended"]) == ("2026-11-02T10:00:00Z", "2026-11-02T10:40:31Z",
                                                           "interrupted")
    assert seg1["seconds"] == 2431 and seg1["work_lost_seconds"] == 1  # the final checkpoint saved all but 1 s
    assert (seg2["started"], seg2["ended"], seg2["seconds"], seg2["instance_type"]) == ("restored", "completed", 2700,
                                                                                        "m6i.large")
    step = r["steps"][0]
    assert (step["checkpoints"], step["checkpoint_seconds"], step["frozen_seconds"]) == (4, 44, 35)
    assert step["bytes_written"] == 1_350_000_000 and (step["restores"], step["restore_seconds"]) == (1, 12.5)
    assert (r["compute_seconds"], r["work_lost_seconds"], r["net_runtime_seconds"]) == (5131, 1, 5130)
    assert (r["wall_clock_seconds"], r["submitted_from"]) == (5400, "first-event")
    assert (r["interruptions"], r["requeues"]) == (1, 1)
    spot = 2431 / 3600 * 0.03 + 2700 / 3600 * 0.04
    ondemand = 2430 / 3600 * 0.085 + 2700 / 3600 * 0.096  # On-Demand pays for the net runtime only
    assert r["spot_cost"] == round(spot, 4) and r["ondemand_cost"] == round(ondemand, 4)
    assert r["savings"] == round(ondemand - spot, 4)


def test_lost_instance_loses_work_since_the_last_checkpoint(store):
    r = job(report_for(store), "5002")
    seg1, seg2 = r["steps"][0]["segments"]
    # no end event: the segment ended at the last event seen for it (the agent's requeue at 12:39:41); the last
    # periodic checkpoint (committed 12:30:00 after 10 s) holds the state of 12:29:50
    assert (seg1["ended"], seg1["end"], seg1["seconds"]) == ("lost", "2026-11-03T12:39:41Z", 2381)
    assert seg1["work_lost_seconds"] == 591
    assert (seg2["ended"], seg2["seconds"], seg2["work_lost_seconds"]) == ("failed", 3600, 0)
    assert (r["compute_seconds"], r["work_lost_seconds"], r["net_runtime_seconds"]) == (5981, 591, 5390)
    assert r["steps"][0]["checkpoints_failed"] == 1 and r["steps"][0]["status"] == "failed"


def test_running_job_is_counted_up_to_now_when_slurm_says_it_runs(store):
    facts = {"5003": {"state": "RUNNING", "submitted": t("2026-11-04T07:30:00")},
             "5001": {"state": "COMPLETED", "submitted": t("2026-11-02T09:58:00")}}
    r = report_for(store, facts)
    running = job(r, "5003")
    assert running["steps"][0]["segments"][0]["ended"] == "running"
    assert running["compute_seconds"] == 3600 and running["wall_clock_seconds"] == 5400  # submitted 07:30
    done = job(r, "5001")
    assert (done["wall_clock_seconds"], done["submitted_from"], done["state"]) == (5520, "slurm", "COMPLETED")
    requeued = job(report_for(store, {"5001": {"state": "COMPLETED", "submitted": t("2026-11-02T10:40:35")}}), "5001")
    assert requeued["submitted_from"] == "first-event"  # Slurm's SubmitTime moved to the requeue: not used
    unknown = job(report_for(store), "5003")  # without Slurm an open segment is not assumed to run on
    assert unknown["steps"][0]["segments"][0]["ended"] == "lost" and unknown["compute_seconds"] == 0


def test_summary_totals(store):
    s = report_for(store)["summary"]
    assert (s["jobs"], s["segments"], s["interruptions"], s["requeues"], s["restores"]) == (3, 5, 2, 2, 2)
    assert s["compute_hours"] == round((5131 + 5981) / 3600, 4)
    assert s["work_lost_hours"] == round(592 / 3600, 4)
    spot = 2431 / 3600 * 0.03 + 2700 / 3600 * 0.04 + 2381 / 3600 * 0.03 + 3600 / 3600 * 0.03
    od = 2430 / 3600 * 0.085 + 2700 / 3600 * 0.096 + 1790 / 3600 * 0.085 + 3600 / 3600 * 0.085
    assert s["spot_cost"] == pytest.approx(spot, abs=2e-4) and s["ondemand_cost"] == pytest.approx(od, abs=2e-4)
    assert s["savings_percent"] == round(100 * (od - spot) / od, 1)


def test_since_filters_jobs(store):
    r = report_for(store, since=t("2026-11-03T00:00:00"))
    assert [j["job_id"] for j in r["jobs"]] == ["5002", "5003"]


def test_unpriced_instance_type_is_flagged(store):
    r = build_report(load_job_events(store), {"c6i.large": PRICES["c6i.large"]}, now=t("2026-11-05T00:00:00"))
    j = job(r, "5001")
    assert j["spot_cost"] is None and j["unpriced_types"] == ["m6i.large"]
    assert job(r, "5002")["spot_cost"] is not None
    assert r["summary"]["jobs_priced"] == 1


def test_history_of_removed_jobs_is_read(store):
    hist = os.path.join(store.root, ".history")
    os.mkdir(hist)
    shutil.move(os.path.join(store.root, "5001", "events.jsonl"), os.path.join(hist, "5001.jsonl"))
    os.rmdir(os.path.join(store.root, "5001"))
    assert job(report_for(store), "5001")["net_runtime_seconds"] == 5130


def test_text_table(store):
    text = render_text(report_for(store))
    assert "job 5001: submitted 2026-11-02T10:00:00Z (first-event), finished 2026-11-02T11:30:00Z; " \
           "1 interruption(s), 1 requeue(s)" in text
    assert "net runtime 1:25:30 vs wall clock 1:30:00; work lost 0:00:01" in text
    assert "interrupted" in text and "lost" in text and "i-0aaa000000000001" in text
    assert text.splitlines()[-1].startswith("  Spot $")


def test_both_time_formats_parse():
    assert parse_time("2026-11-02T10:40:00Z") == t("2026-11-02T10:40:00")
    assert parse_time("2026-11-02T10:40:00.500000Z") == t("2026-11-02T10:40:00.500000")
    assert parse_time("garbage") is None and parse_time(None) is None


# --- CloudWatch --------------------------------------------------------------------------------------------------
@mock_aws
def test_cloudwatch_metrics(store):
    client = boto3.client("cloudwatch", region_name="us-east-1")
    report = report_for(store)
    assert put_metrics(client, "CkptTest", report, "head1") == 12
    names = {m["MetricName"] for m in client.list_metrics(Namespace="CkptTest")["Metrics"]}
    assert {"SavingsUSD", "WorkLostHours", "NetRuntimeHours", "Interruptions"} <= names
    stats = client.get_metric_statistics(
        Namespace="CkptTest", MetricName="Interruptions", Dimensions=[{"Name": "ClusterName", "Value": "head1"}],
        StartTime=t("2026-11-03T00:00:00"), EndTime=t("2026-11-05T00:00:00"), Period=86400, Statistics=["Sum"])
    assert [p["Sum"] for p in stats["Datapoints"]] == [2.0]


# --- CLI ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(store, tmp_path, monkeypatch):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"store: {store.root}\nprices_file: {tmp_path / 'prices.json'}\nprices:\n"
                   "  c6i.large: {spot: 0.03, ondemand: 0.085}\n  m6i.large: {spot: 0.04, ondemand: 0.096}\n")
    monkeypatch.setenv("CKPT_CONFIG", str(cfg))
    monkeypatch.delenv("CKPT_STORE", raising=False)
    return cfg


def test_cli_json(cli_env, capsys):
    assert cli.main(["report", "--no-slurm", "--json", "--job-id", "5001"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [j["job_id"] for j in data["jobs"]] == ["5001"] and data["jobs"][0]["net_runtime_seconds"] == 5130


def test_cli_without_slurm_installed_still_reports(cli_env, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(["report", "--since", "2026-11-03"]) == 0
    out = capsys.readouterr().out
    assert "job 5002" in out and "job 5001" not in out


@pytest.mark.parametrize("argv,code,message", [
    (["report", "--no-slurm", "--job-id", "9999"], EXIT_NOT_FOUND, "ckpt: no events of job 9999 in "),
    (["report", "--no-slurm", "--since", "last tuesday"], EXIT_USAGE, "ckpt: --since 'last tuesday': expected"),
    (["report", "--no-slurm", "--job-id", "../etc"], EXIT_USAGE,
     "ckpt: report: argument --job-id: invalid job id '../etc'"),
    (["report", "--no-slurm", "--job-id", ""], EXIT_USAGE, "ckpt: report: argument --job-id: invalid job id ''"),
], ids=["unknown-job", "bad-since", "bad-job-id", "empty-job-id"])
def test_cli_errors_are_one_line(cli_env, capsys, argv, code, message):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_cli_cloudwatch(cli_env, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        assert cli.main(["report", "--no-slurm", "--cloudwatch", "Ckpt", "--region", "eu-west-1"]) == 0
        names = boto3.client("cloudwatch", region_name="eu-west-1").list_metrics(Namespace="Ckpt")["Metrics"]
        assert len(names) == 12


# --- from a real run: a job interrupted (final checkpoint), lost once (killed), and resumed to completion --------
@pytest.mark.criu
def test_report_of_a_real_interrupted_and_resumed_run(tmp_path):
    require_criu()
    root, runtime = tmp_path / "store", tmp_path / "run"
    root.mkdir()
    env = ckpt_env(root, runtime)
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(DATA / "runner" / "appender.py"), "60", "0.1"]
    store = CheckpointStore(str(root))

    t0 = time.time()
    first = start_ckpt("run", "--job-id", "301", "--interval", "1000", "--", *argv, env=env, cwd=work,
                       out=tmp_path / "o1", err=tmp_path / "e1")
    wait_for(lambda: registered(runtime, "301"), 30, "the wrapper to register")
    time.sleep(1.0)
    t_final = time.time()  # the tool runs until here at least; whatever it did after may be lost at most
    assert run_ckpt("checkpoint", "--job-id", "301", "--final", env=env).returncode == 0
    assert first.wait(timeout=30) == 75
    t1 = time.time()

    second = start_ckpt("run", "--job-id", "301", "--interval", "1", "--", *argv, env=env, cwd=work,
                        out=tmp_path / "o2", err=tmp_path / "e2")
    wait_for(lambda: sum(e["event"] == "checkpoint_committed" for e in store.events("301")) >= 2, 30,
             "a periodic checkpoint after the restore")
    time.sleep(0.7)
    kill_job(second, runtime, "301")  # the instance is lost: no end event
    t2 = time.time()

    third = run_ckpt("run", "--job-id", "301", "--", *argv, env=env, cwd=work)
    assert third.returncode == 0, third.stderr
    t3 = time.time()

    report = build_report(load_job_events(store), {}, now=dt.datetime.now(UTC))
    j = job(report, "301")
    segs = j["steps"][0]["segments"]
    assert [s["ended"] for s in segs] == ["interrupted", "lost", "completed"]
    assert [s["started"] for s in segs] == ["launched", "restored", "restored"]
    # bounds from what the test saw happen, never from how fast this machine is (event times are rounded to ms)
    slack = 0.01
    assert 0 < segs[0]["seconds"] <= t1 - t0 + slack
    assert segs[0]["work_lost_seconds"] <= t1 - t_final + slack  # only what ran after the final was asked for
    assert 0 < segs[1]["work_lost_seconds"] <= segs[1]["seconds"] <= t2 - t1 + slack
    assert 0 < segs[2]["seconds"] <= t3 - t2 + slack
    assert j["restores"] == 2 and j["checkpoints"] >= 2
    assert sum(s["seconds"] for s in segs) <= j["wall_clock_seconds"] <= t3 - t0 + slack
    assert j["net_runtime_seconds"] == pytest.approx(j["compute_seconds"] - j["work_lost_seconds"], abs=0.01)
    assert j["net_runtime_seconds"] < j["wall_clock_seconds"]


def test_planted_links_and_fifos_are_not_read(store, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"event": "segment_started", "time": "2026-11-05T00:00:00Z", "step": "main", "node": "x"}\n')
    os.makedirs(os.path.join(store.root, "6001"))
    os.symlink(secret, os.path.join(store.root, "6001", "events.jsonl"))
    os.makedirs(os.path.join(store.root, "6002"))
    os.mkfifo(os.path.join(store.root, "6002", "events.jsonl"))  # reading it would block forever
    events = load_job_events(store)
    assert "6001" not in events and "6002" not in events and "5001" in events


def test_a_skipped_final_checkpoint_is_counted_and_shown(tmp_path):
    from ckpt_agent.headnode.report_html import render_html

    root = tmp_path / "store"
    (root / "5004").mkdir(parents=True)
    base = {"job_id": "5004", "node": "node1", "instance_id": "i-0aaa000000000004", "instance_type": "c6i.large"}
    lines = [
        {"event": "segment_started", "how": "launched", "step": "main", "time": "2026-11-05T10:00:00Z"},
        {"event": "checkpoint_committed", "final": False, "generation": 3, "seconds": 20.0, "frozen_seconds": 4.0,
         "bytes_written": 10, "step": "main", "time": "2026-11-05T10:30:20Z"},
        {"event": "notice_received", "action": "terminate", "time": "2026-11-05T10:31:00Z"},
        {"event": "final_skipped", "step": "main", "generation": 3, "predicted_seconds": 130.5,
         "time_left_seconds": 97.9, "periodic_age_seconds": 41.0, "recent_seconds": 900,
         "time": "2026-11-05T10:31:01Z"},
        {"event": "segment_ended", "how": "interrupted", "generation": 3, "step": "main",
         "time": "2026-11-05T10:31:02Z"},
        {"event": "requeued", "time": "2026-11-05T10:31:03Z"},
        {"event": "restored", "generation": 3, "seconds": 5.0, "step": "main", "time": "2026-11-05T10:40:00Z"},
        {"event": "segment_started", "how": "restored", "step": "main", "time": "2026-11-05T10:40:00Z"},
        {"event": "segment_ended", "how": "completed", "exit_status": 0, "step": "main",
         "time": "2026-11-05T11:00:00Z"},
    ]
    (root / "5004" / "events.jsonl").write_text("".join(json.dumps({**base, **e}) + "\n" for e in lines))
    events = load_job_events(CheckpointStore(str(root)))
    r = build_report(events, PRICES, now=t("2026-11-06T00:00:00"))
    j = job(r, "5004")
    assert j["finals_skipped"] == 1 and r["summary"]["finals_skipped"] == 1
    assert j["steps"][0]["finals_skipped"] == [{"time": "2026-11-05T10:31:01Z", "generation": 3,
                                                "predicted_seconds": 130.5, "time_left_seconds": 97.9,
                                                "periodic_age_seconds": 41.0}]
    # the work since the periodic checkpoint (its state of 10:30:00) up to the stop is lost: 62 s
    assert j["steps"][0]["segments"][0]["work_lost_seconds"] == 62
    text = render_text(r)
    assert "1 interruption(s), 1 requeue(s), 1 final checkpoint(s) SKIPPED" in text
    assert ("main: final checkpoint skipped at 2026-11-05T10:31:01Z: predicted 130 s, 98 s left; resumed from "
            "checkpoint 3, 41 s old") in text
    assert "1 restore(s), 1 final checkpoint(s) skipped" in text
    html = render_html(r, events)
    assert "1 (1 final skipped)" in html and "finals skipped" in html
    # jobs without a skipped final: no mention
    assert "skipped" not in render_text(build_report({"5004": [{**base, **lines[0]}]}, PRICES,
                                                     now=t("2026-11-06T00:00:00")))
