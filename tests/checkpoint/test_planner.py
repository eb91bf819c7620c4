"""`planner` and `ckpt plan`: a final checkpoint's predicted time against the notice, and what would make
it fit, from the site file's FSx, queues and instance types."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
from ckpt_helpers import REPO

from ckpt_agent import cli
from ckpt_agent.checkpoint.planner import (
    GIB,
    MB,
    Inputs,
    advice,
    final_seconds,
    load_measured,
    measured_record,
    plan_site,
)
from ckpt_agent.errors import ConfigError, UsageError
from ckpt_agent.site.schema import load_site

EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
MIB = 1 << 20


@pytest.fixture(scope="module")
def site():
    return load_site(str(EXAMPLE))


def test_the_model_by_hand(site):
    """2400 GiB at 250 MB/s/TiB = 585.9 MB/s; sim-spot's max_count 40, 10% at once = 4 nodes share it."""
    plans = {p.queue: p for p in plan_site(site, Inputs(job_memory_gib=16, reclaimed_share=0.1))}
    assert set(plans) == {"sim-spot", "sim-spot-xl"}, "queues without checkpointing are not planned"
    p = plans["sim-spot"]
    fsx = 2400 / 1024 * 250
    assert p.fsx_mb_s == pytest.approx(fsx, abs=0.1) and p.nodes_at_once == 4
    assert p.limited_by == "FSx share" and p.node_mb_s == pytest.approx(fsx / 4, abs=0.1)
    predicted = 16 / 2.0 + 16 * GIB / (fsx / 4 * MB)
    assert p.predicted_seconds == pytest.approx(predicted, abs=0.1)
    assert p.budget_seconds == 120 - 20 - 2 and not p.fits
    # the throughput that would make it fit: 4 nodes writing 16 GiB each in the budget less the dump
    assert p.fsx_mb_s_needed == pytest.approx(16 * GIB / (98 - 8) * 4 / MB, abs=0.5)
    assert "needs FSx throughput >= " in advice(p, site) and "GiB at 250 MB/s/TiB" in advice(p, site)
    # one node alone has the whole file system: the xl queue's single reclaimed node fits
    assert plans["sim-spot-xl"].nodes_at_once == 1 and plans["sim-spot-xl"].fits


def test_more_throughput_fits_and_measured_bandwidth_is_a_limit(site):
    bigger = copy.deepcopy(site)
    bigger["storage"]["new"]["storage_capacity_gib"] = 2400 * 4
    p = plan_site(bigger, Inputs(job_memory_gib=16, reclaimed_share=0.1))[0]
    assert p.fits and "fits:" in advice(p, bigger)
    slow = plan_site(bigger, Inputs(job_memory_gib=16, reclaimed_share=0.1, store_mb_s=50))[0]
    assert slow.limited_by == "measured store bandwidth" and not slow.fits


def test_a_link_bound_node_is_told_what_it_can_write(site):
    p = plan_site(site, Inputs(job_memory_gib=100, reclaimed_share=0.025, fsx_mb_s=100000))[0]
    assert p.limited_by == "node network" and not p.fits and p.fsx_mb_s_needed is None
    assert p.max_write_gib == pytest.approx((98 - 50) * 6.25e9 / 8 / GIB, abs=0.1)
    assert f"at most {p.max_write_gib:g} GiB in time" in advice(p, site)


def test_an_incremental_final_with_dirty_tracking_reads_only_the_written_pages(site):
    """With dirty tracking CRIU walks the memory for the written pages and reads only those; a queue that turns it
    off (or streaming, which it needs) reads every page, and so does a full checkpoint."""
    incremental = Inputs(job_memory_gib=100, reclaimed_share=0.1, changed_share=0.05)
    p = plan_site(site, incremental)[0]
    assert p.dirty_tracking and p.dump_seconds == pytest.approx(100 / 4.0 + 5 / 2.0, abs=0.1)
    assert p.predicted_seconds == pytest.approx(p.dump_seconds + 5 * GIB / (p.node_mb_s * MB), abs=0.2)
    faster = plan_site(site, Inputs(job_memory_gib=100, reclaimed_share=0.1, changed_share=0.05, scan_gib_s=10))[0]
    assert faster.dump_seconds == pytest.approx(100 / 10 + 5 / 2.0, abs=0.1)
    for setting, value in (("dirty_tracking", False), ("stream", "off")):
        untracked = copy.deepcopy(site)
        untracked["queues"][0]["checkpoint"][setting] = value
        q = plan_site(untracked, incremental)[0]
        assert not q.dirty_tracking and q.dump_seconds == pytest.approx(100 / 2.0, abs=0.1), setting
    full = plan_site(site, Inputs(job_memory_gib=100, reclaimed_share=0.1))[0]
    assert not full.dirty_tracking and full.dump_seconds == pytest.approx(50, abs=0.1)
    # a dump that cannot fit says which kind it is
    huge = plan_site(site, Inputs(job_memory_gib=1000, reclaimed_share=0.1, changed_share=0.05))[0]
    assert huge.dirty_tracking and not huge.fits
    assert "the dump alone (275 s, its memory walked for the written pages)" in advice(huge, site)
    assert "the dump alone (500 s, every page read)" in advice(plan_site(site, Inputs(job_memory_gib=1000))[0], site)
    with pytest.raises(UsageError, match="--scan-gib-s"):
        plan_site(site, Inputs(scan_gib_s=0))


def _bench_module():
    spec = importlib.util.spec_from_file_location("checkpoint_bench", REPO / "bench" / "checkpoint_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(dd: float, dump: float, stats2: dict, streamed=None, ckpt_wall=None) -> dict:
    """One case of bench/checkpoint_bench.py's results, as it records them (a 1 GiB job; by default its full
    checkpoint took the dump and then dd's time)."""
    stats1 = {"bytes_in": GIB, "bytes_written": GIB, "dump_seconds": dump,
              **({} if streamed is None else {"streamed": streamed})}
    return {"dd": dd, "dd_mib": 1024, "stats1": stats1, "ckpt_wall": dump + dd if ckpt_wall is None else ckpt_wall,
            "stats2": {"bytes_in": GIB, "bytes_new": 64 * MIB, "dump_seconds": 0.2, **stats2}}


def test_the_store_bandwidth_is_what_checkpoints_achieved_where_lower_than_dd():
    """On a node whose cores the checkpoint's hashing shares with the writeback, a checkpoint writes slower than dd:
    the record then holds what the full checkpoints achieved (their time less the dump), never more than dd's."""
    bench = _bench_module()
    slow = [_case(1.0, 0.5, {}, streamed=False, ckpt_wall=0.5 + 2.0) for _ in range(3)]  # writes took 2 s, dd 1 s
    assert bench.plan_inputs(slow, "n")["store_mb_s"] == pytest.approx(GIB / 2.0 / MB, abs=0.1)
    fast = [_case(1.0, 0.5, {}, streamed=False, ckpt_wall=0.5 + 0.5)]  # overlapped: faster than dd, dd's is kept
    assert bench.plan_inputs(fast, "n")["store_mb_s"] == pytest.approx(GIB / 1.0 / MB, abs=0.1)
    streamed_only = [_case(1.0, 1.2, {}, streamed=True, ckpt_wall=1.0)]  # the dump's time covers it all: dd's
    assert bench.plan_inputs(streamed_only, "n")["store_mb_s"] == pytest.approx(GIB / 1.0 / MB, abs=0.1)


def test_the_dump_rate_comes_from_staged_dumps_where_the_bench_had_any():
    """A streamed dump's time includes its writes to the store: with `--stream auto` the first checkpoints are staged
    in tmpfs and give CRIU's own rate; only without any staged one the streamed rate is taken (on the low side)."""
    bench = _bench_module()
    mixed = [_case(1.0, 1.0, {}, streamed=True), _case(1.0, 0.25, {}, streamed=False),
             _case(1.0, 0.5, {}, streamed=False)]
    assert bench.plan_inputs(mixed, "n")["dump_gib_s"] == pytest.approx(3.0, abs=0.01)  # median of 4 and 2
    assert bench.plan_inputs(mixed[:1], "n")["dump_gib_s"] == pytest.approx(1.0, abs=0.01)


def test_the_model_adds_the_dump_and_the_write():
    """planner.final_seconds, shared by `ckpt plan` and the benches' check of the model against measured times."""
    full = final_seconds(memory_bytes=12 * GIB, changed_bytes=12 * GIB, write_bytes=12 * GIB, bandwidth=GIB,
                         tracked=False, dump_gib_s=2.0, scan_gib_s=4.0)
    assert full == pytest.approx((6.0, 18.0))
    final = final_seconds(memory_bytes=12 * GIB, changed_bytes=0.6 * GIB, write_bytes=0.3 * GIB,
                          bandwidth=GIB, tracked=True, dump_gib_s=2.0, scan_gib_s=4.0)
    assert final == pytest.approx((3.3, 3.6))
    bench = _bench_module()
    line = bench.model_check(memory_bytes=12 * GIB, changed_bytes=12 * GIB, write_bytes=12 * GIB,
                             store_mb_s=GIB / 1e6, tracked=False, rates={}, measured=12.0)
    assert line == "predicted 18.00 s, measured 12.00 s (1.50x)"


def test_the_bench_writes_what_plan_reads(tmp_path, capsys):
    """bench/checkpoint_bench.py --plan-inputs: the store's dd bandwidth, the dump rate and, where a dump sent only the
    written pages, the memory walked per second; `ckpt plan --measured` plans with them."""
    bench = _bench_module()
    results = [_case(0.5, 0.5, {"pages_unchanged": 250000}, ckpt_wall=0.6),
               _case(1.0, 1.0, {"pages_unchanged": 250000}, ckpt_wall=0.6), _case(2.0, 0.25, {}, ckpt_wall=0.6)]
    record = bench.plan_inputs(results, "node1, 2 CPUs")
    assert record["store_mb_s"] == pytest.approx(GIB / 1.0 / MB, abs=0.1)  # the median case's dd
    assert record["dump_gib_s"] == pytest.approx(2.0, abs=0.01)
    walked = 0.2 - 64 * MIB / (2.0 * GIB)  # the written pages' own dump taken off
    assert record["dirty_tracking"] and record["scan_gib_s"] == pytest.approx(1 / walked, abs=0.01)
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(record))
    assert load_measured(str(path)) == record

    assert cli.main(["plan", str(EXAMPLE), "--measured", str(path), "--changed", "0.05", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans[0]["dirty_tracking"]
    assert plans[0]["dump_seconds"] == pytest.approx(115.2 / record["scan_gib_s"] + 115.2 * 0.05 / 2.0, abs=0.1)
    # an option overrides its figure; the measured store bandwidth bounds a node that has a large share of FSx
    assert cli.main(["plan", str(EXAMPLE), "--measured", str(path), "--store-mb-s", "50", "--fsx-mb-s", "1e6"]) == 0
    out = capsys.readouterr().out
    assert f"node figures ({path}: node1, 2 CPUs" in out and "store 50 MB/s, dump 2 GiB/s, dirty tracking" in out
    assert "limited by measured store bandwidth" in out

    # a node that could not track written pages: every page read, whatever the queue says
    untracked = bench.plan_inputs([_case(1.0, 0.5, {})], "node2")
    assert untracked["dirty_tracking"] is False and "scan_gib_s" not in untracked
    path.write_text(json.dumps(untracked))
    assert cli.main(["plan", str(EXAMPLE), "--measured", str(path), "--changed", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "no dirty tracking (every page read)" in out and "(written pages only)" not in out


@pytest.mark.parametrize("content, what", [
    (None, "cannot read the measured figures"),
    ("{", "not a measured record"),
    ("[" * 30000 + "]" * 30000, "not a measured record"),  # deeper than json.loads goes
    ("[]", "not a measured record of format 1"),
    ('{"format": 2}', "not a measured record of format 1"),
    ('{"format": 1, "store_mb_s": -1}', "store_mb_s: must be a number > 0"),
    ('{"format": 1, "store_mb_s": 100, "scan_gib_s": "fast"}', "scan_gib_s: must be a number > 0"),
    ('{"format": 1, "store_mb_s": 100, "where": "x\\u001b[2J", "when": "now"}', "where: must be a line of plain text"),
    ('{"format": 1, "store_mb_s": 100, "where": "x", "when": "now"}', "dirty_tracking: must be true or false"),
])
def test_a_bad_measured_record_is_one_line_and_exit_78(tmp_path, capsys, content, what):
    path = tmp_path / "measured.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=what):
        load_measured(str(path))
    assert cli.main(["plan", str(EXAMPLE), "--measured", str(path)]) == 78
    err = capsys.readouterr().err
    assert str(path) in err and what in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_existing_file_system_needs_its_throughput(site):
    existing = copy.deepcopy(site)
    del existing["storage"]["new"]
    with pytest.raises(UsageError, match="--fsx-mb-s"):
        plan_site(existing, Inputs())
    assert plan_site(existing, Inputs(fsx_mb_s=1000))


def test_plan_command(capsys):
    assert cli.main(["plan", str(EXAMPLE), "--job-memory", "16", "--reclaimed", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["queue"] for p in out] == ["sim-spot", "sim-spot-xl"] and out[1]["fits"] is True
    assert cli.main(["plan", str(EXAMPLE)]) == 0
    assert "sim-spot: 115.2 GiB job on r6i.4xlarge, 10 node(s) at once, dump 57.6 s, " in capsys.readouterr().out
    assert cli.main(["plan", str(EXAMPLE), "--changed", "0.05", "--scan-gib-s", "8"]) == 0
    assert "dump 17.3 s (written pages only), 5.8 GiB to write" in capsys.readouterr().out
    for bad in (["--reclaimed", "2"], ["--job-memory", "nan"], ["--changed", "-1"], ["--dump-gib-s", "inf"],
                ["--scan-gib-s", "0"]):
        try:
            code = cli.main(["plan", str(EXAMPLE), *bad])
        except SystemExit as e:  # argparse refuses the value before main runs
            code = e.code
        assert code == 2, bad
        err = capsys.readouterr().err
        assert "Traceback" not in err


def test_validate_warns_when_the_example_cannot_fit_its_largest_jobs(capsys):
    assert cli.main(["validate", str(EXAMPLE)]) == 0
    captured = capsys.readouterr()
    assert "valid: cluster eda-spot" in captured.out
    assert "warning: queue sim-spot: a final checkpoint of a 115.2 GiB job does NOT fit" in captured.err


def test_validate_sizes_with_a_nodes_measured_figures(tmp_path, capsys):
    """`ckpt validate --measured FILE`: the worst case (a full final) with what a node measured; a bad record is one
    line, exit 78, as in `ckpt plan`."""
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(measured_record(where="node1", when="now", store_mb_s=50, dump_gib_s=2.0,
                                               scan_gib_s=4.0, dirty_tracking=True)))
    assert cli.main(["validate", str(EXAMPLE), "--measured", str(slow)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning: queue ")]
    assert warned and all(line.endswith(f"(see `ckpt plan`; node figures from {slow})") for line in warned), err
    assert all("limited by measured store bandwidth" in line for line in warned), err
    assert len(warned) > 1  # at 50 MB/s a node's store, not FSx, bounds every queue's largest job

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1, "store_mb_s": -1}')
    assert cli.main(["validate", str(EXAMPLE), "--measured", str(bad)]) == 78
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- the wrapper's deadline plan -----------------------------------------------------------------------------------
def test_interval_plan_by_hand():
    from ckpt_agent.checkpoint.planner import plan_interval

    # 1 GiB new per 600 s at 100 MB/s seen: at a 1800 s interval a final writes 3 GiB: 5 + 32.2 s fits in 98 s
    fits = plan_interval(interval=1800, budget=98, frozen_seconds=5, bytes_written=GIB, write_seconds=GIB / (100 * MB),
                         seconds_since_previous=600)
    assert fits.interval_seconds == 1800 and fits.predicted_final_seconds == pytest.approx(5 + 3 * GIB / (100 * MB))
    # 10 GiB new per 600 s: 3 x 107 s at 1800 s does not fit; the interval that does: (98 - 5) s of writing
    late = plan_interval(interval=1800, budget=98, frozen_seconds=5, bytes_written=10 * GIB,
                         write_seconds=10 * GIB / (100 * MB), seconds_since_previous=600)
    rate, bw = 10 * GIB / 600, 100 * MB
    assert late.predicted_final_seconds > 98
    assert late.interval_seconds == pytest.approx(93 * bw / rate)
    assert 5 + rate * late.interval_seconds / bw == pytest.approx(98)
    # a dump that alone exceeds the budget: as often as allowed, never below the floor
    hopeless = plan_interval(interval=1800, budget=98, frozen_seconds=120, bytes_written=GIB, write_seconds=10,
                             seconds_since_previous=600)
    assert hopeless.interval_seconds == 60
    assert plan_interval(interval=1800, budget=98, frozen_seconds=1, bytes_written=0, write_seconds=1,
                         seconds_since_previous=600) is None


def test_wrapper_shortens_its_interval_and_records_the_decision(tmp_path, capsys):
    from ckpt_agent.checkpoint.runner import Runner, RunOptions
    from ckpt_agent.store.events import WRITER
    from ckpt_agent.store.generations import CheckpointStore

    (tmp_path / "store").mkdir()
    store = CheckpointStore(str(tmp_path / "store"))
    store.ensure_job("77", "main")
    runner = Runner(RunOptions(job_id="77", step="main", argv=["true"], interval=1800,
                               runtime_dir=str(tmp_path / "run"), budget=98), store, backend=None)
    heavy = {"frozen_seconds": 5.0, "seconds": 5.0 + 10 * GIB / (100 * MB), "bytes_written": 10 * GIB}
    plan = runner.plan_deadline(heavy, since_previous=600)
    assert runner.interval == plan.interval_seconds < 1800
    assert WRITER.flush(30)
    events = [json.loads(line) for line in (tmp_path / "store" / "77" / "events.jsonl").read_text().splitlines()]
    planned = [e for e in events if e["event"] == "interval_planned"]
    assert len(planned) == 1 and planned[0]["previous_interval_seconds"] == 1800
    assert planned[0]["predicted_final_seconds"] > 98 and planned[0]["interval_seconds"] == round(runner.interval, 3)
    assert "periodic checkpoints every" in capsys.readouterr().err
    # the job calms down: back to the configured interval, recorded too
    light = {"frozen_seconds": 5.0, "seconds": 6.0, "bytes_written": 100 * MB}
    runner.plan_deadline(light, since_previous=600)
    assert runner.interval == 1800
    assert WRITER.flush(30)
    assert sum(1 for line in (tmp_path / "store" / "77" / "events.jsonl").read_text().splitlines()
               if "interval_planned" in line) == 2


# --- on a notice: a final checkpoint that cannot fit, and a recent periodic one -------------------------------------
def test_final_decision_by_hand():
    from ckpt_agent.checkpoint.planner import decide_final

    # 100 MB/s changed, 500 MB/s to the store, 2 s frozen: 300 s after the periodic one a final takes 2 + 60 s
    rates = dict(frozen_seconds=2.0, changed_bytes_per_second=100 * MB, store_bytes_per_second=500 * MB)
    fits = decide_final(**rates, periodic_age_seconds=300, time_left_seconds=98, recent_seconds=900)
    assert not fits.skip and fits.predicted_seconds == pytest.approx(62)
    late = decide_final(**rates, periodic_age_seconds=600, time_left_seconds=98, recent_seconds=900)
    assert late.skip and late.predicted_seconds == pytest.approx(122)
    assert late.to_json() == {"predicted_seconds": 122.0, "time_left_seconds": 98, "periodic_age_seconds": 600,
                              "recent_seconds": 900}
    # too old to stand in: the final is tried all the same (best effort)
    old = decide_final(**rates, periodic_age_seconds=600, time_left_seconds=98, recent_seconds=500)
    assert not old.skip and old.predicted_seconds > 98
    # nothing to predict from (fewer than two periodic checkpoints), or no periodic checkpoint at all: try the final
    assert not decide_final(frozen_seconds=2.0, changed_bytes_per_second=None, store_bytes_per_second=None,
                            periodic_age_seconds=10, time_left_seconds=1.5, recent_seconds=900).skip
    assert not decide_final(frozen_seconds=None, changed_bytes_per_second=None, store_bytes_per_second=None,
                            periodic_age_seconds=None, time_left_seconds=1.5, recent_seconds=900).skip


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class RefusingBackend:
    """Records the checkpoints asked of it and fails them (a final that was tried, and failed)."""

    def __init__(self):
        self.asked = []

    def checkpoint(self, job, *, final, reason, timeout):
        from ckpt_agent.errors import CkptError

        self.asked.append((final, reason, timeout))
        raise CkptError("refused by the test's backend")


def _runner_with_a_tool(tmp_path, recent=None):
    """A Runner whose tool is a real process (its stand-in for the namespace init), with a fake clock."""
    import subprocess

    from ckpt_agent.checkpoint.engine import JobState
    from ckpt_agent.checkpoint.runner import Runner, RunOptions
    from ckpt_agent.store.generations import CheckpointStore

    (tmp_path / "store").mkdir()
    store = CheckpointStore(str(tmp_path / "store"))
    store.ensure_job("78", "main")
    runner = Runner(RunOptions(job_id="78", step="main", argv=["sleep"], interval=1800, recent=recent,
                               runtime_dir=str(tmp_path / "run"), budget=98), store, backend=RefusingBackend())
    runner.clock = FakeClock()
    tool = subprocess.Popen(["sleep", "600"])
    runner.job = JobState(job_id="78", step="main", init_pid=tool.pid, cwd=str(tmp_path), argv=["sleep"],
                          pipe_inodes={})
    return runner, tool


def _took_periodic(runner, generation, frozen, changed_per_s, bandwidth):
    runner._newest_periodic = {"at": runner.clock(), "generation": generation, "frozen_seconds": frozen}
    written = changed_per_s * 600
    runner.plan_deadline({"frozen_seconds": frozen, "seconds": frozen + written / bandwidth,
                          "bytes_written": written}, since_previous=600)


def test_wrapper_skips_a_final_that_cannot_fit_and_stops_the_tool(tmp_path, capsys):
    from ckpt_agent.store.events import WRITER

    runner, tool = _runner_with_a_tool(tmp_path)
    try:
        _took_periodic(runner, 4, frozen=2.0, changed_per_s=10 * MB, bandwidth=100 * MB)
        runner.clock.now += 1200  # 2 + 10 MB/s * 1200 s / 100 MB/s = 122 s > 98 s left; 1200 s < the interval
        reply = runner.checkpoint(final=True, reason="spot-interruption", timeout=98, may_skip=True)
        assert reply["skipped"] and reply["generation"] == 4 and reply["predicted_seconds"] == pytest.approx(122)
        assert tool.wait(timeout=30) == -9  # stopped as after a final checkpoint
        assert runner._stopped_by_final
        with pytest.raises(Exception, match="already stopped"):
            runner.checkpoint(final=True, reason="spot-interruption", timeout=98, may_skip=True)
        assert WRITER.flush(30)
        events = [json.loads(line) for line in (tmp_path / "store" / "78" / "events.jsonl").read_text().splitlines()]
        skipped = [e for e in events if e["event"] == "final_skipped"]
        assert len(skipped) == 1 and skipped[0]["generation"] == 4 and skipped[0]["periodic_age_seconds"] == 1200
        assert skipped[0]["time_left_seconds"] == 98 and skipped[0]["recent_seconds"] == 1800
        assert "stopping the job to resume from checkpoint 4" in capsys.readouterr().err
    finally:
        tool.kill()
        tool.wait()


def test_wrapper_tries_the_final_when_the_periodic_is_old_or_it_fits(tmp_path):
    runner, tool = _runner_with_a_tool(tmp_path, recent=600)
    try:
        _took_periodic(runner, 4, frozen=2.0, changed_per_s=10 * MB, bandwidth=100 * MB)
        runner.clock.now += 1200
        assert not runner.final_decision(98).skip  # older than --recent 600 s: best effort
        runner.clock.now -= 900  # 300 s old: 2 + 30 s fits
        decision = runner.final_decision(98)
        assert not decision.skip and decision.predicted_seconds == pytest.approx(32)
        # a final asked by its owner (not the agent, which requeues) is never skipped: the backend is asked
        runner.clock.now += 900
        with pytest.raises(Exception, match="refused by the test"):
            runner.checkpoint(final=True, reason="manual", timeout=98, may_skip=False)
        assert runner.backend.asked == [(True, "manual", 98)]
        assert tool.poll() is None and not runner._stopped_by_final
    finally:
        tool.kill()
        tool.wait()
