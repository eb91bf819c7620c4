"""`planner` and `ckpt plan`: a final checkpoint's predicted time against the notice, and what would make
it fit, from the site file's FSx, queues and instance types."""

from __future__ import annotations

import copy
import json

import pytest
from ckpt_helpers import REPO

from ckpt_agent import cli
from ckpt_agent.checkpoint.planner import GIB, MB, Inputs, advice, plan_site
from ckpt_agent.errors import UsageError
from ckpt_agent.site.schema import load_site

EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"


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
    assert "sim-spot: 115.2 GiB job on r6i.4xlarge" in capsys.readouterr().out
    for bad in (["--reclaimed", "2"], ["--job-memory", "nan"], ["--changed", "-1"], ["--dump-gib-s", "inf"]):
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
