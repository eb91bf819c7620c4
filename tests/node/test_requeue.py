"""The requeue after a Spot notice, on a real local Slurm cluster with Slurm's default cred_expire (120 s):

- jobs never show FAILED on their way back to the queue, also with several jobs on the node and a slow
  `scontrol requeue`; an `afterok` dependent job runs once, after the moved job completed;
- a requeued job starts again long before Slurm's own requeue hold (cred_expire + 1 s) would have let it;
- a requeued job lands only on a node of its CPU family (node features stand for CPU families here: node1 and
  node3 are "cpu-a", node2, which the scheduler would prefer, is "cpu-b");
- a job that lands on a CPU that cannot restore it anyway (requeued by Slurm itself, without a constraint) is
  requeued to its family (its wrapper asks the node agent), and resumes there: it neither fails nor starts from
  zero. node2's "CPU"
  refusing is `criu restore` failing there with the first error its CPU check logs on another CPU (its criu is a
  wrapper that fails that one command so).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from ckpt_helpers import DATA, keep_or_remove, require_criu, wait_for

from ckpt_agent.adapters.slurm import JobInfo
from ckpt_agent.errors import CkptError, SlurmError
from ckpt_agent.node.requeue import REVOKE_MARGIN_SECONDS, Requeuer, combine_features, family_constraint, read_marker

REQUEUE_DELAY_SECONDS = 4  # each `scontrol requeue` of the agents takes this long (a slow controller)
SLURM_DEFAULT_REQUEUE_HOLD_SECONDS = 121  # cred_expire (120 s) + 1: batch_requeue_fini() in job_mgr.c
FAMILIES = ["cpu-a", "cpu-b"]
NODE_FEATURES = {"node1": "cpu-a", "node2": "cpu-b", "node3": "cpu-a"}


# ---- the policy, without Slurm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("features,expected", [
    (["dynamic", "r6i.4xlarge"], "r6i.4xlarge|r6i.8xlarge"),
    (["static", "r6a.4xlarge"], "r6a.4xlarge"),
    (["dynamic", "m6i.large"], None),
], ids=["intel", "amd", "no-family"])
def test_family_of_a_node(features, expected):
    assert family_constraint(features, ["r6i.4xlarge|r6i.8xlarge", "r6a.4xlarge"]) == expected


@pytest.mark.parametrize("current,family,expected", [
    ("(null)", "cpu-a", "cpu-a"),
    ("bigmem", "cpu-a", "bigmem&cpu-a"),
    ("bigmem&cpu-b", "cpu-a", "bigmem&cpu-a"),  # an earlier requeue's family is replaced, the user's kept
    ("", "a.x|a.y", "(a.x|a.y)"),
], ids=["none", "user-constraint", "replaces-ours", "alternatives"])
def test_constraint_keeps_the_users_own(current, family, expected):
    assert combine_features(current, family, FAMILIES + ["a.x|a.y"]) == expected


class FakeSlurm:
    """Job states in order, one per `scontrol show job`; records the updates."""

    def __init__(self, states, fail_requeue=False):
        self.states = list(states)
        self.calls = []
        self.fail_requeue = fail_requeue

    def requeue(self, job_id):
        self.calls.append(("requeue", job_id))
        if self.fail_requeue:
            raise SlurmError("scontrol requeue 7: Requested operation is presently disabled (exit 1)")

    def job_info(self, job_id):
        state, reason = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return JobInfo(job_id=job_id, state=state, user="u", uid=1, gid=1, nodes="", restart_count=1,
                       submit_time=None, start_time=None, end_time=None, requeue=True, exit_code="0:0",
                       reason=reason, raw={"JobState": state, "Features": "(null)"})

    def set_job_features(self, job_id, features):
        self.calls.append(("features", job_id, features))

    def start_now(self, job_id):
        self.calls.append(("start_now", job_id))

    def node_features(self, node):
        return ["cpu-a"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def _requeuer(tmp_path, slurm, events):
    clock = Clock()
    return Requeuer("node1", str(tmp_path), slurm, FAMILIES, emit=lambda job, event, **f: events.append(event),
                    clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize("states,expected", [
    ([("COMPLETING", "None"), ("REQUEUED", "None"), ("PENDING", "BeginTime")], "start_now"),
    ([("PENDING", "JobHeldUser")], None),  # held by someone: not ours to release
    ([("RUNNING", "None")], None),  # already started again
    ([("COMPLETING", "None")], None),  # the old step never goes: Slurm's own delay applies
], ids=["after-the-old-step", "held", "started", "stuck"])
def test_expedite_only_a_job_waiting_for_its_requeue_delay(tmp_path, states, expected):
    slurm, events = FakeSlurm(states), []
    r = _requeuer(tmp_path, slurm, events)
    r.expedite("7", requeued_at=0.0)
    assert [c[0] for c in slurm.calls] == ([expected] if expected else [])
    if expected:
        assert r.clock() >= REVOKE_MARGIN_SECONDS  # never within the old credential's revocation second


def test_requeue_marks_constrains_and_reports(tmp_path):
    slurm, events = FakeSlurm([("PENDING", "Priority")]), []
    r = _requeuer(tmp_path, slurm, events)
    assert r.requeue("7", reason="spot-interruption", family=r.node_family())
    assert read_marker(str(tmp_path), "7")["ok"] is True
    assert slurm.calls[:2] == [("requeue", "7"), ("features", "7", "cpu-a")]
    assert events == ["requeued"]


def test_a_failed_requeue_releases_the_waiting_wrapper(tmp_path):
    slurm, events = FakeSlurm([("RUNNING", "None")], fail_requeue=True), []
    r = _requeuer(tmp_path, slurm, events)
    assert not r.requeue("7", reason="spot-interruption", family="cpu-a")
    marker = read_marker(str(tmp_path), "7")
    assert marker["ok"] is False and "presently disabled" in marker["error"]
    assert events == ["requeue_failed"] and slurm.calls == [("requeue", "7")]


def test_a_refused_restore_is_not_sent_back_to_the_same_family(tmp_path):
    slurm, events = FakeSlurm([("RUNNING", "None")]), []
    r = _requeuer(tmp_path, slurm, events)  # node1 and the checkpoint's node are both cpu-a
    with pytest.raises(CkptError, match="is of the checkpoint's CPU family cpu-a, yet CRIU refused"):
        r.requeue_to_checkpoint_family("7", "node3")
    assert slurm.calls == []


# ---- on a real cluster -----------------------------------------------------------------------------------------

def _slurm_missing() -> str:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "scontrol", "sbatch")
               if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    return f"not installed: {', '.join(missing)}" if missing else ""


@pytest.fixture(scope="module")
def rq(request):
    """A 3-node cluster with Slurm's default cred_expire, node features for CPU families, accounting when
    installed, and node agents whose `scontrol requeue` is slow."""
    if _slurm_missing():
        pytest.skip(_slurm_missing())
    require_criu()
    from ckpt_dev import accounting, shared_venv
    from ckpt_dev.agents import NodeAgents
    from ckpt_dev.slurm_cluster import LocalCluster

    workdir = tempfile.mkdtemp(prefix="ckpt-requeue-", dir="/tmp")
    os.chmod(workdir, 0o755)
    slow = Path(workdir) / "slow-scontrol"
    slow.mkdir()
    real = shutil.which("scontrol")
    (slow / "scontrol").write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f'if [ "${{1:-}}" = requeue ]; then sleep {REQUEUE_DELAY_SECONDS}; fi\n'
        f'exec {real} "$@"\n')
    (slow / "scontrol").chmod(0o755)
    real_criu = shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/usr/bin")
    other_cpu = Path(workdir) / "other-cpu"  # node2's CRIU: its restore fails, as on another CPU family
    other_cpu.mkdir()
    (other_cpu / "criu").write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        'if [ "${1:-}" = restore ] && [ "${2:-}" = -D ] && [ "${4:-}" = -o ]; then\n'
        '  echo "(00.01) Error (criu/arch/x86/cpu.c:274): CPU xsave size mismatch (a stand-in for another family)" \\\n'
        '    > "$3/$5"; exit 1\n'
        "fi\n"
        f'exec {real_criu} "$@"\n')
    (other_cpu / "criu").chmod(0o755)
    cluster = LocalCluster(workdir, nodes=tuple(NODE_FEATURES), cpus_per_node=4, cred_expire=None,
                           node_features=NODE_FEATURES, accounting=not accounting.missing_binaries())
    agents = None
    try:
        cluster.start()
        bin_dir = shared_venv.refresh()
        agents = NodeAgents(cluster, bin_dir, extra_config={"agent": {"cpu_families": FAMILIES}},
                            extra_env={"PATH": f"{slow}:{os.environ.get('PATH', '/usr/bin:/bin')}"}).start()
        for node in NODE_FEATURES:  # what the jobs' wrappers read (agent.yaml on a real node)
            config = Path(workdir) / "etc" / f"ckpt-{node}.yaml"
            criu = other_cpu / "criu" if node == "node2" else real_criu
            # the cluster's one signing key, as on a real cluster: the agents verify what root's wrappers sign
            config.write_text(json.dumps({"criu": str(criu), "agent": {"key_file": agents.key}}))
            config.chmod(0o644)
            cluster.set_node_env(node, {"CKPT_CONFIG": str(config)})
        yield cluster, agents
    finally:
        if agents is not None:
            agents.stop()
        cluster.stop()
        keep_or_remove(request, workdir, "requeue cluster")


@pytest.fixture
def cluster_after(rq):
    """The cluster for one test; afterwards, also when the test failed: no notice pending, every drained node
    resumed, so that one failing test does not fail the next."""
    yield rq
    cluster, agents = rq
    slurm = cluster.slurm()
    for node in NODE_FEATURES:
        agents.imds[node].clear()
        try:
            if "DRAIN" in slurm.node_state(node):
                slurm.resume_node(node)
        except SlurmError as e:
            print(f"could not resume {node} after the test: {e}")


def _script(bin_dir: str, work: Path, steps: int) -> str:
    return f"""#!/bin/bash
#SBATCH --requeue --open-mode=append -o job.out -e job.err
set -euo pipefail
cd {work}
{bin_dir}/ckpt run --interval 3600 -- python3 {DATA / 'runner' / 'appender.py'} {steps} 0.25
"""


def _events(cluster, job: str) -> list:
    return [json.loads(x) for x in (Path(cluster.store) / job / "events.jsonl").read_text().splitlines()]


def _t(event: dict) -> datetime:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00"))


def _sacct_states(cluster, job: str) -> list:
    out = subprocess.run(["sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", "JobID,State"],
                         env=cluster.env(), capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split("|")[1] for line in out.splitlines() if line.startswith(job + "|")]


def _jobcomp_states(cluster, job: str) -> list:
    path = Path(cluster.log_dir) / "jobcomp.txt"
    if not path.exists():
        return []
    return [word.split("=", 1)[1] for line in path.read_text().splitlines() if f"JobId={job} " in line
            for word in line.split() if word.startswith("JobState=")]


@pytest.mark.slurm
@pytest.mark.criu
def test_moved_jobs_never_fail_restart_at_once_and_keep_their_cpu_family(cluster_after, tmp_path):
    cluster, agents = cluster_after
    jobs, works = [], {}
    for i in range(3):
        work = Path(cluster.workdir) / "home" / "root" / f"sim{i}"
        work.mkdir(parents=True)
        job = cluster.sbatch(_script(agents.bin_dir, work, 80), cwd=str(work))
        jobs.append(job)
        works[job] = work
    dep_out = Path(cluster.workdir) / "home" / "root" / "dependent.out"
    dependent = cluster.sbatch(f"#!/bin/bash\necho \"ran after {jobs[0]}\" >> {dep_out}\n",
                               extra_args=[f"--dependency=afterok:{jobs[0]}", "-o", "/dev/null"])
    for job in jobs:
        assert cluster.wait_job(job, "RUNNING", timeout=60).nodes == "node1"
        reg = Path(cluster.runtime_dir("node1")) / "jobs" / f"{job}.main.json"
        wait_for(reg.exists, 60, f"job {job}'s wrapper to register on node1")
        wait_for(lambda w=works[job]: (w / "log.txt").exists(), 60, f"job {job}'s tool to start")

    agents.imds["node1"].inject_spot_notice("terminate", seconds_from_now=120)
    for job in jobs:
        done = cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=110)
        assert done.state == "COMPLETED", (job, done, (works[job] / "job.err").read_text(),
                                           agents.log_tail("node1"))
        assert done.restart_count == 1
        # node2 weighs less (the scheduler's first choice) but is cpu-b: only node3 shares node1's CPU family
        assert done.nodes == "node3", done
        assert (works[job] / "log.txt").read_text().splitlines() == [f"step {i}" for i in range(80)]

    for job in jobs:
        err = (works[job] / "job.err").read_text()
        assert "was not requeued" not in err and "could not requeue" not in err, err
        events = _events(cluster, job)
        kinds = [e["event"] for e in events]
        requeued = next(e for e in events if e["event"] == "requeued")
        assert requeued["features"] == "cpu-a"
        restored = next(e for e in events if e["event"] == "restored")
        assert restored["node"] == "node3"
        assert kinds.index("checkpoint_committed") < kinds.index("requeued") < kinds.index("restored")
        assert "requeue_expedited" in kinds, kinds
        # Slurm's own hold would have kept the job pending for 121 s after the requeue
        waited = (_t(restored) - _t(requeued)).total_seconds()
        assert waited < SLURM_DEFAULT_REQUEUE_HOLD_SECONDS / 2, (job, waited)
        # the completion log and accounting: requeued, then completed; never FAILED
        comp = _jobcomp_states(cluster, job)
        assert "FAILED" not in comp, (job, comp)
        if cluster.accounting:
            states = wait_for(lambda j=job: (s := _sacct_states(cluster, j)) and "COMPLETED" in s and s, 60,
                              f"accounting of job {job}")
            assert "FAILED" not in states and "REQUEUED" in states, (job, states)

    dep = cluster.wait_job(dependent, ("COMPLETED", "FAILED", "CANCELLED", "PENDING"), timeout=60)
    dep = cluster.wait_job(dependent, ("COMPLETED", "FAILED", "CANCELLED"), timeout=60) \
        if dep.state == "PENDING" and dep.reason != "DependencyNeverSatisfied" else dep
    assert dep.state == "COMPLETED", dep
    assert dep_out.read_text().splitlines() == [f"ran after {jobs[0]}"]
    first = cluster.job_info(jobs[0])
    assert dep.start_time >= first.end_time
    if cluster.accounting:
        # slurmdbd records the end a moment after slurmctld reports it: wait for the record, then compare
        states = wait_for(lambda: (s := _sacct_states(cluster, dependent)) and "RUNNING" not in s
                          and "PENDING" not in s and s, 60, f"accounting of job {dependent}")
        assert states == ["COMPLETED"], states


@pytest.mark.slurm
@pytest.mark.criu
def test_a_restore_refused_on_the_wrong_cpu_requeues_to_the_right_family(cluster_after):
    cluster, agents = cluster_after
    slurm = cluster.slurm()
    for node in NODE_FEATURES:  # after the previous test: every node idle and responding
        wait_for(lambda n=node: slurm.node_state(n) == "IDLE", 60, f"{node} to be IDLE")
    work = Path(cluster.workdir) / "home" / "root" / "wrong-cpu"
    work.mkdir(parents=True)
    script = _script(agents.bin_dir, work, 120).replace("--interval 3600", "--interval 2")
    job = cluster.sbatch(script, cwd=str(work))
    assert cluster.wait_job(job, "RUNNING", timeout=60).nodes == "node1"
    wait_for(lambda: [g for g in (Path(cluster.store) / job / "main").glob("gen-*") if "partial" not in g.name], 60,
             "a committed periodic checkpoint")
    # node1 is lost without a notice: Slurm requeues the job itself, with no constraint
    slurm.drain_node("node1", "lost")
    slurm.requeue(job)

    def start_when_held(expected_features: str) -> None:
        """Stand in for Slurm's requeue hold (cred_expire + 1 s): nobody expedites a requeue the agent did not do."""
        info = wait_for(lambda: (i := cluster.job_info(job)).state == "PENDING" and i.reason == "BeginTime" and i,
                        60, f"job {job} to be pending after its requeue")
        assert info.raw.get("Features") == expected_features, info.raw.get("Features")
        slurm.start_now(job)

    start_when_held("(null)")
    # node2 (cpu-b, the scheduler's first choice) refuses the restore; its agent sends the job to cpu-a at once
    done = cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=SLURM_DEFAULT_REQUEUE_HOLD_SECONDS - 20)
    err = (work / "job.err").read_text()
    assert done.state == "COMPLETED" and done.nodes == "node3", (done, err)
    assert done.restart_count == 2
    assert "ckpt: this node (node2) cannot restore job" in err and "CPU lacks features" in err, err
    assert "ckpt: started job" in err and err.count("ckpt: started job") == 1, "never restarted from zero"
    assert f"ckpt: resumed job {job} step main from checkpoint" in err
    assert (work / "log.txt").read_text().splitlines() == [f"step {i}" for i in range(120)]
    events = _events(cluster, job)
    moved = next(e for e in events if e["event"] == "requeued")
    assert (moved["reason"], moved["node"], moved["features"]) == ("incompatible-cpu", "node2", "cpu-a")
    assert "requeue_expedited" in [e["event"] for e in events]
    assert next(e for e in events if e["event"] == "restored")["node"] == "node3"
    assert "FAILED" not in _jobcomp_states(cluster, job)
    if cluster.accounting:
        states = wait_for(lambda: (s := _sacct_states(cluster, job)) and "COMPLETED" in s and s, 60, "accounting")
        assert "FAILED" not in states, states
