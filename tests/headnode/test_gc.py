"""`gc` and `ckpt gc`: the cleanup policy as a table over crafted stores, with job states from a fake Slurm
and (marked slurm) from the real local cluster; symlink and swap attacks; Slurm unreachable; watermarks; a
checkpoint being written while gc runs; the CLI's exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import time

import pytest

from ckpt_agent import cli
from ckpt_agent.adapters.slurm import LIVE_STATES
from ckpt_agent.errors import EXIT_SLURM, SlurmError
from ckpt_agent.headnode.gc import (
    DryRunActuator,
    GarbageCollector,
    GcLock,
    JobView,
    Policy,
    RemoveActuator,
    StepView,
    decide,
)
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.store.manifest import FORMAT_VERSION, parse
from ckpt_agent.util import proc

HOUR = 3600
DAY = 86400
NOW = time.time()


class FakeSlurm:
    def __init__(self, states=None, end_times=None, fail=False):
        self.states = dict(states or {})
        self.end_times = dict(end_times or {})
        self.fail = fail
        self.asked = []

    def job_states(self, job_ids):
        self.asked.append(list(job_ids))
        if self.fail:
            raise SlurmError("squeue -h -r -t all -o %i|%A|%T: Unable to contact slurm controller (exit 1)")
        return {j: self.states.get(j, "UNKNOWN") for j in job_ids}

    def job_info(self, job_id):
        from ckpt_agent.adapters.slurm import JobNotFound

        if job_id not in self.end_times:
            raise JobNotFound(f"job {job_id}: unknown to Slurm")

        class Info:
            end_time = self.end_times[job_id]

        return Info()


def age(path, seconds):
    t = NOW - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def add_gen(store, job, step, payload, seconds_old):
    cs = store.chunks_for(job, "none")
    ref, _ = cs.put(payload)
    number, partial = store.begin(job, step)
    m = {"format": FORMAT_VERSION, "created": "2026-11-29T00:00:00.000000Z", "files": [],
         "images": [{"name": "pages-1.img", "size": ref.size, "chunks": [ref.to_json()]}]}
    gen = store.commit(partial, number, parse(m, "test"))
    age(gen.path, seconds_old)
    return gen


def make_job(store, job, gens=2, seconds_old=10 * DAY, step="main", finished=False, partial_age=None):
    """A job with `gens` generations (one distinct 4 KiB chunk each), the newest `seconds_old` old."""
    store.ensure_job(job, step)
    with store.job_lock(job):  # as the engine's first checkpoint does: the lock file exists
        pass
    for i in range(gens):
        add_gen(store, job, step, f"{job}-{step}-{i}".encode() * 512, seconds_old + (gens - i) * 60)
    store.append_event(job, {"event": "segment_started", "time": "2026-11-29T00:00:00.000000Z", "job_id": job})
    age(os.path.join(store.job_dir(job), "events.jsonl"), seconds_old)
    if finished:
        store.record_result(job, step, 0)
        age(os.path.join(store.step_dir(job, step), "result.json"), seconds_old)
    if partial_age is not None:
        _, p = store.begin(job, step)
        with open(os.path.join(p, "junk"), "wb") as fh:
            fh.write(b"x" * 100)
        age(p, partial_age)


def gens_left(store, job, step="main"):
    return [g.number for g in store.generations(job, step)]


def chunk_count(store, job):
    n = 0
    for _, _, files in os.walk(store.chunk_dir(job)):
        n += len(files)
    return n


@pytest.fixture(autouse=True)
def no_syncfs(monkeypatch):
    """Crafting stores commits many generations: skip the whole-file-system sync each commit makes (seconds on a
    busy machine); gc never syncs."""
    monkeypatch.setattr("ckpt_agent.store.chunks.syncfs", lambda path: None)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    return CheckpointStore(str(root))


def run_gc(store, slurm, dry_run=False, usage=None, hook=None, now=NOW, **policy):
    act = DryRunActuator(hook) if dry_run else RemoveActuator(hook)
    lines = []
    kwargs = {"usage": usage} if usage else {"usage": lambda root: (100, 10)}
    gc = GarbageCollector(store, slurm, Policy(**policy), act, now=lambda: now, say=lines.append, **kwargs)
    out = gc.run()
    return out, lines


# --- the policy as a table (pure) ---------------------------------------------------------------------------------
def view(state, activity_age, gens=3, finished=False, partials=(), end_age=None):
    step = StepView("main", [(i + 1, NOW - activity_age - (gens - i)) for i in range(gens)],
                    [(f"gen-{gens + 1:06d}.partial-99", NOW - a) for a in partials], finished)
    return JobView("100", state, NOW - activity_age, [step], None if end_age is None else NOW - end_age)


POLICY_CASES = [
    # id, view, expected removals (kind:name), expected pressure candidates
    ("completed-after-grace", view("COMPLETED", 2 * HOUR), ["job:"], []),
    ("completed-within-grace", view("COMPLETED", 10 * 60), ["generation:gen-000001"], ["job:"]),
    ("completed-end-time-counts", view("COMPLETED", 2 * HOUR, end_age=30 * 60), ["generation:gen-000001"], ["job:"]),
    ("failed-after-grace", view("FAILED", 2 * HOUR), ["job:"], []),
    ("cancelled-after-grace", view("CANCELLED", 2 * HOUR), ["job:"], []),
    ("timeout-after-grace", view("TIMEOUT", 2 * HOUR), ["job:"], []),
    ("oom-after-grace", view("OUT_OF_MEMORY", 2 * HOUR), ["job:"], []),
    ("node-fail-after-grace", view("NODE_FAIL", 2 * HOUR), ["job:"], []),
    ("boot-fail-after-grace", view("BOOT_FAIL", 2 * HOUR), ["job:"], []),
    ("deadline-after-grace", view("DEADLINE", 2 * HOUR), ["job:"], []),
    ("preempted-after-grace", view("PREEMPTED", 2 * HOUR), ["job:"], []),
    ("running-keeps-newest-two", view("RUNNING", 30 * DAY), ["generation:gen-000001"], ["generation:gen-000002"]),
    ("pending-keeps-newest-two", view("PENDING", 30 * DAY), ["generation:gen-000001"], ["generation:gen-000002"]),
    ("requeued", view("REQUEUED", 30 * DAY), ["generation:gen-000001"], ["generation:gen-000002"]),
    ("requeue-hold", view("REQUEUE_HOLD", 30 * DAY), ["generation:gen-000001"], ["generation:gen-000002"]),
    ("suspended", view("SUSPENDED", 30 * DAY), ["generation:gen-000001"], ["generation:gen-000002"]),
    ("completing", view("COMPLETING", 30 * DAY), ["generation:gen-000001"], ["generation:gen-000002"]),
    ("a-future-slurm-state-is-live", view("SOMETHING_NEW", 30 * DAY), ["generation:gen-000001"],
     ["generation:gen-000002"]),
    ("running-one-gen-never-touched", view("RUNNING", 30 * DAY, gens=1), [], []),
    ("running-finished-step-loses-gens", view("RUNNING", 30 * DAY, finished=True),
     ["generation:gen-000001", "generation:gen-000002", "generation:gen-000003"], []),
    ("running-old-partial-goes", view("RUNNING", 1, gens=1, partials=[2 * HOUR]), ["partial:gen-000002.partial-99"],
     []),
    ("running-young-partial-stays", view("RUNNING", 1, gens=1, partials=[60]), [], []),
    ("finished-step-young-partial-goes", view("RUNNING", 1, gens=1, partials=[60], finished=True),
     ["generation:gen-000001", "partial:gen-000002.partial-99"], []),
    ("unknown-after-max-age", view("UNKNOWN", 15 * DAY), ["job:"], []),
    ("unknown-before-max-age", view("UNKNOWN", 13 * DAY), ["generation:gen-000001"], ["job:"]),
]


@pytest.mark.parametrize("job,removed,pressure", [c[1:] for c in POLICY_CASES], ids=[c[0] for c in POLICY_CASES])
def test_policy(job, removed, pressure):
    d = decide(job, NOW, Policy(grace=HOUR, max_age=14 * DAY, keep=2))
    assert [f"{a.kind}:{a.name}" for a in d.actions] == removed
    assert [f"{a.kind}:{a.name}" for a in d.pressure] == pressure


def test_newest_generation_of_a_live_job_is_never_a_candidate():
    for state in sorted(LIVE_STATES | {"A_STATE_OF_A_FUTURE_SLURM"}):
        for keep in (1, 2, 5):
            d = decide(view(state, 100 * DAY, gens=4), NOW, Policy(keep=keep))
            gone = {a.name for a in d.actions + d.pressure}
            assert "gen-000004" not in gone and all(a.kind != "job" for a in d.actions + d.pressure)


# --- over a crafted store -----------------------------------------------------------------------------------------
STORE_CASES = [
    # id, state, newest age, finished step, end time age, expect job dir kept, expect generations left
    ("completed-old", "COMPLETED", 2 * HOUR, True, None, False, None),
    ("completed-young", "COMPLETED", 10 * 60, True, None, True, []),
    ("completed-end-recent", "COMPLETED", 3 * HOUR, False, 20 * 60, True, [2, 3]),
    ("cancelled-old", "CANCELLED", 2 * HOUR, False, 2 * HOUR, False, None),
    ("running", "RUNNING", 30 * DAY, False, None, True, [2, 3]),
    ("pending-requeued", "PENDING", 30 * DAY, False, None, True, [2, 3]),
    ("unknown-old", "UNKNOWN", 20 * DAY, False, None, False, None),
    ("unknown-young", "UNKNOWN", 2 * DAY, False, None, True, [2, 3]),
]


@pytest.mark.parametrize("state,newest,finished,end_age,kept,left", [c[1:] for c in STORE_CASES],
                         ids=[c[0] for c in STORE_CASES])
def test_gc_over_a_store(store, state, newest, finished, end_age, kept, left):
    make_job(store, "7001", gens=3, seconds_old=newest)
    if finished:
        store.prune("7001", "main", 0)
        store.record_result("7001", "main", 0)
        age(os.path.join(store.step_dir("7001", "main"), "result.json"), newest)
    ends = {"7001": dt.datetime.fromtimestamp(NOW - end_age, dt.timezone.utc)} if end_age else {}
    out, lines = run_gc(store, FakeSlurm({"7001": state}, ends), grace=HOUR, keep=2)
    assert os.path.isdir(store.job_dir("7001")) == kept, lines
    if kept:
        assert gens_left(store, "7001") == left
        if finished:
            assert store.result("7001", "main")["exit_status"] == 0  # result.json stays until the job goes
        assert chunk_count(store, "7001") == len(left)  # chunks of removed generations were reclaimed
    else:
        assert os.path.isfile(os.path.join(store.root, ".history", "7001.jsonl"))  # events kept for the report
        assert any(line.startswith("removed 7001: job ") for line in lines)
    assert not out.errors


def test_dry_run_prints_the_same_and_removes_nothing(store):
    make_job(store, "8001", gens=3, seconds_old=3 * HOUR)
    make_job(store, "8002", gens=3, seconds_old=3 * HOUR)
    slurm = FakeSlurm({"8001": "COMPLETED", "8002": "RUNNING"})
    before = sorted(os.walk(store.root))
    dry, dry_lines = run_gc(store, slurm, dry_run=True)
    assert sorted(os.walk(store.root)) == before
    real, real_lines = run_gc(store, slurm)
    assert [line.replace("would remove", "removed") for line in dry_lines] == real_lines
    assert dry.freed == real.freed > 0
    assert not os.path.exists(store.job_dir("8001")) and gens_left(store, "8002") == [2, 3]


def test_freed_bytes_are_reported(store):
    make_job(store, "8101", gens=3, seconds_old=3 * HOUR)
    out, lines = run_gc(store, FakeSlurm({"8101": "RUNNING"}))
    assert gens_left(store, "8101") == [2, 3]
    assert out.chunks == [("8101", 1, len(b"8101-main-0") * 512)]  # the chunk only generation 1 used
    assert any("unreferenced chunk(s) of job 8101" in line for line in lines)


def test_slurm_unreachable_removes_nothing(store):
    make_job(store, "9001", gens=3, seconds_old=30 * DAY)
    before = sorted(os.walk(store.root))
    with pytest.raises(SlurmError, match="nothing removed"):
        run_gc(store, FakeSlurm(fail=True))
    assert sorted(os.walk(store.root)) == before


def test_non_slurm_job_ids_are_never_sent_to_slurm(store):
    make_job(store, "demo-1", gens=1, seconds_old=20 * DAY)
    make_job(store, "9101", gens=1, seconds_old=1)
    slurm = FakeSlurm({"9101": "RUNNING"})
    run_gc(store, slurm)
    assert slurm.asked == [["9101"]]
    assert not os.path.exists(store.job_dir("demo-1"))  # unknown, older than max_age


def test_checkpoint_being_written_is_left_alone(store):
    make_job(store, "9201", gens=3, seconds_old=3 * HOUR, partial_age=3 * HOUR)
    with store.job_lock("9201"):  # a writer holds the lock shared
        out, lines = run_gc(store, FakeSlurm({"9201": "COMPLETED"}), usage=lambda r: (100, 99))
        assert os.path.isdir(store.job_dir("9201"))
        assert len(store.partials("9201", "main")) == 1 and gens_left(store, "9201") == [1, 2, 3]
        assert ("9201", "a checkpoint is being written; left for the next run") in out.skipped
    out, _ = run_gc(store, FakeSlurm({"9201": "COMPLETED"}))
    assert not os.path.exists(store.job_dir("9201"))


def test_abandoned_partial_of_a_lock_free_job_goes(store):
    make_job(store, "9301", gens=1, seconds_old=60, partial_age=2 * HOUR)
    run_gc(store, FakeSlurm({"9301": "RUNNING"}))
    assert store.partials("9301", "main") == [] and gens_left(store, "9301") == [1]


# --- watermarks ---------------------------------------------------------------------------------------------------
def test_watermark_removes_oldest_eligible_first(store):
    make_job(store, "9401", gens=1, seconds_old=5 * 60)  # finished within grace: eligible under pressure
    make_job(store, "9402", gens=1, seconds_old=50 * 60)  # older: goes first
    make_job(store, "9403", gens=2, seconds_old=20 * 60)  # running: only its fallback may go
    slurm = FakeSlurm({"9401": "COMPLETED", "9402": "COMPLETED", "9403": "RUNNING"})
    total = 1000 * 1024
    used = int(total * 0.86)
    out, lines = run_gc(store, slurm, usage=lambda r: (total, used), keep=2)
    # each job holds ~4-8 KiB: one removal cannot bring 86% under 75%, so every eligible checkpoint goes
    assert not os.path.exists(store.job_dir("9401")) and not os.path.exists(store.job_dir("9402"))
    assert gens_left(store, "9403") == [2]
    removed = [a.target for a, _ in out.removed]
    assert removed.index("9402") < removed.index("9401")
    assert "only live jobs' newest checkpoints" in out.pressure and out.pressure in lines


def test_watermark_stops_under_low(store):
    make_job(store, "9501", gens=1, seconds_old=50 * 60)
    make_job(store, "9502", gens=1, seconds_old=5 * 60)
    slurm = FakeSlurm({"9501": "COMPLETED", "9502": "COMPLETED"})
    total = 100 * 1024
    used = int(total * 0.75) + 2048  # just above low; above high only by the configured high of 75.5
    out, _ = run_gc(store, slurm, usage=lambda r: (total, used), high_watermark=75.5, low_watermark=75.0)
    assert not os.path.exists(store.job_dir("9501")) and os.path.isdir(store.job_dir("9502"))
    assert out.pressure == ""


def test_below_high_watermark_nothing_extra(store):
    make_job(store, "9601", gens=1, seconds_old=5 * 60)
    out, lines = run_gc(store, FakeSlurm({"9601": "COMPLETED"}), usage=lambda r: (100, 84))
    assert os.path.isdir(store.job_dir("9601")) and not out.removed and not lines


# --- symlink and swap attacks -------------------------------------------------------------------------------------
@pytest.fixture
def outside(tmp_path):
    """A directory outside the store that looks like store content, to be kept intact."""
    d = tmp_path / "outside"
    (d / "main" / "gen-000001").mkdir(parents=True)
    (d / "main" / "gen-000001" / "manifest.json").write_text("{}")
    (d / "ab").mkdir()
    (d / "ab" / ("ab" + "0" * 62)).write_text("precious")
    (d / "events.jsonl").write_text("precious\n")
    (d / "precious").write_text("precious")
    return d


def snapshot(path):
    return sorted((r, tuple(sorted(ds)), tuple(sorted(fs))) for r, ds, fs in os.walk(path))


def test_link_planted_as_job_dir_is_not_followed(store, outside):
    os.symlink(outside, os.path.join(store.root, "6001"))
    before = snapshot(outside)
    out, _ = run_gc(store, FakeSlurm({"6001": "COMPLETED"}), usage=lambda r: (100, 99))
    assert snapshot(outside) == before and os.path.islink(os.path.join(store.root, "6001"))
    assert ("6001", "not a job directory (a symbolic link or a file?); left alone") in out.skipped


def test_link_planted_as_step_and_chunk_dir_is_not_followed(store, outside):
    make_job(store, "6101", gens=3, seconds_old=30 * DAY)
    os.symlink(outside, os.path.join(store.job_dir("6101"), "evil"))  # a "step"
    free = [p for p in (f"{i:02x}" for i in range(256)) if not os.path.exists(os.path.join(store.chunk_dir("6101"), p))]
    os.symlink(outside, os.path.join(store.chunk_dir("6101"), free[0]))  # a chunk prefix dir
    os.symlink(outside / "precious", os.path.join(store.chunk_dir("6101"), free[1]))
    before = snapshot(outside)
    run_gc(store, FakeSlurm({"6101": "RUNNING"}))
    assert snapshot(outside) == before
    assert gens_left(store, "6101") == [2, 3]
    run_gc(store, FakeSlurm({"6101": "COMPLETED"}))  # the whole job goes; the links go, their targets stay
    assert snapshot(outside) == before and not os.path.lexists(store.job_dir("6101"))


def test_chunks_dir_swapped_for_a_link(store, outside):
    make_job(store, "6201", gens=3, seconds_old=30 * DAY)
    chunks = store.chunk_dir("6201")
    os.rename(chunks, chunks + ".real")
    os.symlink(outside, chunks)
    before = snapshot(outside)
    run_gc(store, FakeSlurm({"6201": "RUNNING"}))
    assert snapshot(outside) == before


@pytest.mark.parametrize("stage", ["before-open", "opened"])
@pytest.mark.parametrize("swapped", ["job", "step"])
def test_directory_swapped_for_a_link_mid_run(store, outside, tmp_path, stage, swapped):
    make_job(store, "6301", gens=3, seconds_old=3 * HOUR)
    state = "COMPLETED" if swapped == "job" else "RUNNING"
    victim = store.job_dir("6301") if swapped == "job" else store.step_dir("6301", "main")
    target = "6301" if swapped == "job" else "main"
    done = []

    def hook(where, name):
        if where == stage and name == target and not done:
            os.rename(victim, str(tmp_path / "moved-away"))
            os.symlink(outside / "main" if swapped == "step" else outside, victim)  # holds a gen-000001 too
            done.append(name)

    before = snapshot(outside)
    out, _ = run_gc(store, FakeSlurm({"6301": state}), hook=hook)
    assert done and snapshot(outside) == before
    assert not os.path.isdir(victim) or os.path.islink(victim)  # a link or nothing; never a followed target


def test_swap_of_job_dir_after_scan_is_refused(store, outside):
    make_job(store, "6401", gens=3, seconds_old=3 * HOUR)

    class SwappingSlurm(FakeSlurm):
        def job_states(self, job_ids):
            os.rename(store.job_dir("6401"), store.job_dir("6401") + "-moved")
            os.symlink(outside, store.job_dir("6401"))
            return super().job_states(job_ids)

    before = snapshot(outside)
    out, _ = run_gc(store, SwappingSlurm({"6401": "RUNNING"}))
    assert snapshot(outside) == before
    assert ("6401", "vanished or replaced by a link; left alone") in out.skipped


def test_planted_history_link_is_refused(store, outside):
    os.symlink(outside, os.path.join(store.root, ".history"))
    make_job(store, "6501", gens=1, seconds_old=3 * HOUR)
    before = snapshot(outside)
    run_gc(store, FakeSlurm({"6501": "COMPLETED"}))
    assert snapshot(outside) == before and not os.path.exists(store.job_dir("6501"))


def test_history_older_than_history_max_age_is_pruned_links_and_strangers_kept(store, outside):
    """<store>/.history grows by one file per removed job: gc removes those older than gc.history_max_age, and
    never follows a link or removes what is not a history file."""
    hist = os.path.join(store.root, ".history")
    os.mkdir(hist, 0o700)
    ages = {"old.jsonl": 500 * DAY, "recent.jsonl": 10 * DAY, "notes.txt": 900 * DAY}
    for name, age in ages.items():
        path = os.path.join(hist, name)
        with open(path, "w") as fh:
            fh.write('{"event": "segment_started"}\n')
        os.utime(path, (NOW - age, NOW - age))
    os.symlink(outside, os.path.join(hist, "linked.jsonl"))
    os.mkdir(os.path.join(hist, "dir.jsonl"))
    for name in ("linked.jsonl", "dir.jsonl"):  # as old as the oldest: only their kind keeps them
        os.utime(os.path.join(hist, name), (NOW - 900 * DAY, NOW - 900 * DAY), follow_symlinks=False)
    before = snapshot(outside)

    _, lines = run_gc(store, FakeSlurm({}), dry_run=True, history_max_age=400 * DAY)
    assert "old.jsonl" in os.listdir(hist) and any("would remove .history/old.jsonl" in ln for ln in lines)

    _, lines = run_gc(store, FakeSlurm({}), history_max_age=400 * DAY)
    assert sorted(os.listdir(hist)) == ["dir.jsonl", "linked.jsonl", "notes.txt", "recent.jsonl"]
    assert any("removed .history/old.jsonl: events of a removed job, 500 days old" in ln for ln in lines), lines
    assert snapshot(outside) == before


# --- lock and CLI ----------------------------------------------------------------------------------------------
def test_overlapping_runs_are_excluded(tmp_path):
    first, second = GcLock(str(tmp_path / "run" / "gc.lock")), GcLock(str(tmp_path / "run" / "gc.lock"))
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


@pytest.fixture
def cli_env(store, tmp_path, monkeypatch):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"store: {store.root}\nruntime_dir: {tmp_path / 'run'}\ngc:\n  grace: 3600\n")
    monkeypatch.setenv("CKPT_CONFIG", str(cfg))
    monkeypatch.delenv("CKPT_STORE", raising=False)
    monkeypatch.delenv("CKPT_RUNTIME_DIR", raising=False)
    return cfg


def test_cli_slurm_unreachable_is_one_line_exit_76(store, cli_env, monkeypatch, capsys):
    make_job(store, "5001", gens=1, seconds_old=30 * DAY)
    monkeypatch.setenv("PATH", "/nonexistent")  # squeue cannot run
    assert cli.main(["gc"]) == EXIT_SLURM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckpt: cannot ask Slurm for job states, nothing removed: squeue")
    assert os.path.isdir(store.job_dir("5001"))


def test_cli_dry_run_and_grace_flag(store, cli_env, monkeypatch, capsys):
    make_job(store, "5101", gens=2, seconds_old=2 * HOUR)
    monkeypatch.setattr("ckpt_agent.commands.gc.Slurm.from_config", lambda cfg: FakeSlurm({"5101": "COMPLETED"}))
    assert cli.main(["gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 5101: job COMPLETED" in out and "would free" in out
    assert os.path.isdir(store.job_dir("5101"))
    assert cli.main(["gc", "--grace", str(3 * HOUR)]) == 0  # not yet: the flag overrides the config
    assert os.path.isdir(store.job_dir("5101"))
    assert cli.main(["gc"]) == 0
    assert not os.path.exists(store.job_dir("5101"))
    assert "removed 5101" in capsys.readouterr().out


def test_cli_another_run_holds_the_lock(store, cli_env, tmp_path, monkeypatch, capsys):
    make_job(store, "5201", gens=1, seconds_old=30 * DAY)
    monkeypatch.setattr("ckpt_agent.commands.gc.Slurm.from_config", lambda cfg: FakeSlurm({}))
    lock = GcLock(str(tmp_path / "run" / "gc.lock"))
    assert lock.acquire()
    try:
        assert cli.main(["gc"]) == 0
        assert "another gc run holds" in capsys.readouterr().err
        assert os.path.isdir(store.job_dir("5201"))
    finally:
        lock.release()


# --- with the real local Slurm ----------------------------------------------------------------------------------
@pytest.mark.slurm
def test_gc_with_real_slurm_states(cluster, slurm_user, tmp_path):
    done = cluster.sbatch("#!/bin/bash\ntrue\n", user=slurm_user)
    cancelled = cluster.sbatch("#!/bin/bash\nsleep 300\n", user=slurm_user)
    running = cluster.sbatch("#!/bin/bash\nsleep 300\n", user=slurm_user)
    pending = cluster.sbatch("#!/bin/bash\ntrue\n", user=slurm_user, extra_args=["--begin=now+1hour"])
    requeued = cluster.sbatch("#!/bin/bash\nsleep 300\n", user=slurm_user)
    try:
        cluster.wait_job(done, "COMPLETED", timeout=30)
        cluster.wait_job(cancelled, "RUNNING", timeout=30)
        proc.run(["scancel", cancelled], env=cluster.env())
        cluster.wait_job(cancelled, "CANCELLED", timeout=20)
        cluster.wait_job(running, "RUNNING", timeout=30)
        cluster.wait_job(requeued, "RUNNING", timeout=30)
        proc.run(["scontrol", "requeuehold", requeued], env=cluster.env())
        cluster.wait_job(requeued, ("PENDING", "REQUEUE_HOLD", "REQUEUED"), timeout=30)
        root = tmp_path / "store"
        root.mkdir()
        store = CheckpointStore(str(root))
        unknown = str(int(done) + 100000)
        for job in (done, cancelled, running, pending, requeued, unknown):
            make_job(store, job, gens=3, seconds_old=30 * DAY)
        # the directories look 30 days idle, but Slurm's end times are seconds ago: the grace counts from those
        out, lines = run_gc(store, cluster.slurm(), grace=HOUR, keep=2, now=time.time() + 1)
        assert os.path.isdir(store.job_dir(done)) and os.path.isdir(store.job_dir(cancelled)), lines
        assert not os.path.exists(store.job_dir(unknown))
        out, lines = run_gc(store, cluster.slurm(), grace=0, keep=2, now=time.time() + 1)
        assert not out.errors, out.errors
        assert not os.path.exists(store.job_dir(done)) and not os.path.exists(store.job_dir(cancelled)), (lines, out)
        assert not os.path.exists(store.job_dir(unknown))
        for job in (running, pending, requeued):
            assert gens_left(store, job) == [2, 3], (job, lines)
    finally:
        proc.run(["scancel", running, pending, requeued], env=cluster.env(), ok_codes=(0, 1))


@pytest.mark.slurm
def test_gc_cli_with_unreachable_real_slurm(local_cluster, store, cli_env, tmp_path, monkeypatch, capsys):
    import re

    conf = re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=9", open(local_cluster.conf_path).read())
    broken = tmp_path / "slurm.conf"
    broken.write_text(conf + "MessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(broken))
    make_job(store, "4001", gens=1, seconds_old=30 * DAY)
    assert cli.main(["gc"]) == EXIT_SLURM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing removed" in err[0]
    assert os.path.isdir(store.job_dir("4001"))


def test_events_of_removed_jobs_are_kept_for_report(store):
    make_job(store, "3001", gens=1, seconds_old=3 * HOUR)
    run_gc(store, FakeSlurm({"3001": "COMPLETED"}))
    with open(os.path.join(store.root, ".history", "3001.jsonl")) as fh:
        assert json.loads(fh.readline())["event"] == "segment_started"


def test_directories_that_are_not_jobs_are_left_alone(store):
    os.makedirs(os.path.join(store.root, "lost+found"))
    os.makedirs(os.path.join(store.root, "admin-notes", "old"))
    for d in ("lost+found", "admin-notes"):
        age(os.path.join(store.root, d), 100 * DAY)
    make_job(store, "demo-2", gens=1, seconds_old=100 * DAY)  # a manual `ckpt run --job-id demo-2`: a job
    out, _ = run_gc(store, FakeSlurm({}))
    assert os.path.isdir(os.path.join(store.root, "lost+found"))
    assert os.path.isdir(os.path.join(store.root, "admin-notes", "old"))
    assert not os.path.exists(store.job_dir("demo-2"))
    assert {w for w, _ in out.skipped} == {"lost+found", "admin-notes"}


def test_cli_negative_grace_is_a_usage_error(cli_env, capsys):
    assert cli.main(["gc", "--grace", "-5"]) == 2
    assert capsys.readouterr().err.strip() == "ckpt: --grace -5: must be >= 0 seconds"


def test_sweep_chunks_never_follows_a_linked_chunks_dir(store, outside):
    """The engine's own sweep after each checkpoint (store.sweep_chunks with no arguments) walks like gc does."""
    make_job(store, "6601", gens=1, seconds_old=60)
    chunks = store.chunk_dir("6601")
    os.rename(chunks, chunks + ".real")
    os.symlink(outside, chunks)
    before = snapshot(outside)
    assert store.sweep_chunks("6601") == (0, 0)
    assert snapshot(outside) == before


def test_damaged_kept_manifest_keeps_all_chunks(store):
    make_job(store, "6701", gens=3, seconds_old=30 * DAY)
    newest = store.generations("6701", "main")[-1]
    with open(newest.manifest_path, "w") as fh:
        fh.write("{damaged")
    out, _ = run_gc(store, FakeSlurm({"6701": "RUNNING"}))
    assert gens_left(store, "6701") == [2, 3] and chunk_count(store, "6701") == 3
    assert any(w == "6701/chunks" and "unreadable" in why for w, why in out.skipped)


def test_usage_is_measured_once_before_removing(store):
    """What the normal pass freed counts against the high watermark, measured before gc removed anything."""
    make_job(store, "9701", gens=1, seconds_old=3 * HOUR)  # removed by the policy: ~5.6 KiB
    make_job(store, "9702", gens=1, seconds_old=5 * 60)  # within grace: removed only under pressure
    calls = []
    total = 100 * 1024

    def usage(root):
        calls.append(root)
        return total, int(total * 0.86)

    slurm = FakeSlurm({"9701": "COMPLETED", "9702": "COMPLETED"})
    run_gc(store, slurm, usage=usage, high_watermark=85.0, low_watermark=75.0)
    assert calls == [store.root]
    assert os.path.isdir(store.job_dir("9702"))  # 86% minus what 9701 freed is under the high watermark


class PartitionSlurm(FakeSlurm):
    def __init__(self, states, partitions):
        super().__init__(states)
        self.partitions = partitions

    def job_partitions(self, job_ids):
        return {j: self.partitions[j] for j in job_ids if j in self.partitions}


def test_each_queue_keeps_its_own_number_of_generations(store):
    """The head node's gc runs with every queue's `keep` (issue 12, defect 9): the job's partition decides."""
    for job in ("6001", "6002", "6003"):
        make_job(store, job, gens=4, seconds_old=HOUR)
    slurm = PartitionSlurm({"6001": "RUNNING", "6002": "RUNNING", "6003": "RUNNING"},
                           {"6001": "sim-spot", "6002": "sim-spot-xl", "6003": "elsewhere"})
    out, lines = run_gc(store, slurm, keep=2, keep_by_queue={"sim-spot": 2, "sim-spot-xl": 3})
    assert gens_left(store, "6001") == [3, 4]
    assert gens_left(store, "6002") == [2, 3, 4]
    assert gens_left(store, "6003") == [3, 4]  # not a listed queue: the default


def test_without_per_queue_keeps_partitions_are_not_asked(store):
    make_job(store, "6101", gens=3, seconds_old=HOUR)
    out, _ = run_gc(store, FakeSlurm({"6101": "RUNNING"}), keep=1)  # FakeSlurm has no job_partitions
    assert gens_left(store, "6101") == [3]
