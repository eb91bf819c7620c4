"""The Slurm adapter: argv and parsing with a fake `run`, then the real thing on the local cluster (marker slurm)."""

from __future__ import annotations

import os
import re
from datetime import datetime

import pytest
from ckpt_helpers import wait_for

from ckpt_agent.adapters.slurm import JobNotFound, Slurm, job_info_from_record, parse_record
from ckpt_agent.errors import CommandError, SlurmError
from ckpt_agent.util import proc

JOB_LINE = (
    "JobId=4242 JobName=long sim run UserId=alice(1001) GroupId=eda(2001) MCS_label=N/A Priority=1 Nice=0 "
    "Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=2 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:05 TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-11-29T03:38:16 "
    "EligibleTime=2026-11-29T03:38:16 StartTime=2026-11-29T03:38:17 EndTime=Unknown Deadline=N/A "
    "Partition=batch AllocNode:Sid=localhost:14723 ReqNodeList=(null) ExcNodeList=(null) NodeList=node2 "
    "BatchHost=node2 NumNodes=1 NumCPUs=1 ReqB:S:C:T=0:0:*:* Socks/Node=* WorkDir=/home/alice/run 1 "
    "StdErr=/home/alice/out.txt StdIn=/dev/null StdOut=/home/alice/out.txt Power="
)
ARRAY_LINE = (
    "JobId=4250 ArrayJobId=4248 ArrayTaskId=2 JobName=arr UserId=bob(1002) GroupId=bob(1002) JobState=PENDING "
    "Reason=BeginTime Requeue=0 Restarts=0 ExitCode=0:0 SubmitTime=2026-11-29T03:38:16 StartTime=Unknown "
    "EndTime=Unknown NodeList=(null)"
)


class FakeRun:
    """Answers by the argv prefix (the command without its directory); records every call."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def __call__(self, argv, **kwargs):
        self.calls.append((list(argv), kwargs))
        words = (os.path.basename(argv[0]), *argv[1:])
        for prefix, answer in self.answers.items():
            if tuple(words[: len(prefix)]) == prefix:
                if isinstance(answer, Exception):
                    raise answer
                out, err = answer if isinstance(answer, tuple) else (answer, "")
                return proc.Result(list(argv), 0, out, err)
        raise AssertionError(f"unexpected command {argv}")


def fail(argv, stderr, code=1):
    return CommandError(list(argv), code, stderr)


# -- parsing -------------------------------------------------------------------------------------------------------


def test_parse_record_keeps_spaces_in_values():
    rec = parse_record(JOB_LINE)
    assert rec["JobName"] == "long sim run"
    assert rec["WorkDir"] == "/home/alice/run 1"
    assert rec["AllocNode:Sid"] == "localhost:14723"
    assert rec["Power"] == ""


def test_job_info_from_record():
    info = job_info_from_record(parse_record(JOB_LINE))
    assert (info.job_id, info.state, info.user, info.uid, info.gid) == ("4242", "RUNNING", "alice", 1001, 2001)
    assert (info.nodes, info.restart_count, info.requeue, info.exit_code) == ("node2", 2, True, "0:0")
    assert info.submit_time == datetime(2026, 11, 29, 3, 38, 16).astimezone()
    assert info.submit_time.tzinfo is not None
    assert info.end_time is None
    assert info.std_out == "/home/alice/out.txt"


def test_array_task_is_shown_as_slurm_does():
    info = job_info_from_record(parse_record(ARRAY_LINE))
    assert (info.job_id, info.numeric_id, info.state, info.nodes, info.requeue) == ("4248_2", "4250", "PENDING", "",
                                                                                      False)


def test_state_flags_are_dropped():
    info = job_info_from_record(parse_record("JobId=7 JobState=COMPLETING+REQUEUED UserId=a(1) GroupId=a(1)"))
    assert info.state == "COMPLETING"


# -- commands (fake run) -------------------------------------------------------------------------------------------


def test_job_info_command_and_env():
    run = FakeRun({("scontrol", "show", "job"): JOB_LINE + "\n"})
    info = Slurm(run=run, env={"SLURM_CONF": "/x/slurm.conf"}).job_info("4242")
    assert info.user == "alice"
    argv, kwargs = run.calls[0]
    assert argv == ["scontrol", "show", "job", "-o", "4242"]
    assert kwargs["env"]["SLURM_CONF"] == "/x/slurm.conf"
    assert kwargs["timeout"] > 0


def test_job_info_picks_the_requested_array_task():
    run = FakeRun({("scontrol",): ARRAY_LINE.replace("4250", "4249").replace("TaskId=2", "TaskId=1") + "\n"
                   + ARRAY_LINE + "\n"})
    assert Slurm(run=run).job_info("4248_2").numeric_id == "4250"


def test_unknown_job_raises_job_not_found():
    argv = ["scontrol", "show", "job", "-o", "99"]
    run = FakeRun({("scontrol",): fail(argv, "slurm_load_jobs error: Invalid job id specified\n")})
    with pytest.raises(JobNotFound, match=r"^scontrol show job -o 99: slurm_load_jobs error: Invalid job id"):
        Slurm(run=run).job_info("99")


def test_drain_resume_requeue_argv():
    run = FakeRun({("scontrol",): ""})
    slurm = Slurm(run=run, bin_dir="/opt/slurm/bin")
    slurm.drain_node("node1", "spot interruption: terminate at 08:22:00Z\n(instance i-1)")
    slurm.resume_node("node1")
    slurm.requeue("123_4")
    slurm.requeue(124)
    assert [c[0] for c in run.calls] == [
        ["/opt/slurm/bin/scontrol", "update", "NodeName=node1", "State=DRAIN",
         "Reason=spot interruption: terminate at 08:22:00Z (instance i-1)"],
        ["/opt/slurm/bin/scontrol", "update", "NodeName=node1", "State=RESUME"],
        ["/opt/slurm/bin/scontrol", "requeue", "123_4"],
        ["/opt/slurm/bin/scontrol", "requeue", "124"],
    ]


@pytest.mark.parametrize("bad", ["-h", "12;rm -rf /", "", "12 13", "abc", "1_x"])
def test_bad_job_ids_never_reach_a_command(bad):
    run = FakeRun({})
    with pytest.raises(SlurmError, match="not a Slurm job id"):
        Slurm(run=run).requeue(bad)
    assert run.calls == []


def test_bad_node_name_is_refused():
    with pytest.raises(SlurmError, match="not a Slurm node name"):
        Slurm(run=FakeRun({})).drain_node("--help", "x")


def test_failure_is_one_line_naming_the_command():
    argv = ["scontrol", "update", "NodeName=node9", "State=DRAIN", "Reason=x"]
    run = FakeRun({("scontrol",): fail(argv, "slurm_update error: Invalid node name specified\n")})
    with pytest.raises(SlurmError) as e:
        Slurm(run=run).drain_node("node9", "x")
    assert str(e.value) == ("scontrol update NodeName=node9 State=DRAIN Reason=x: slurm_update error: Invalid node "
                            "name specified (exit 1)")
    assert not isinstance(e.value, JobNotFound)


def test_missing_binary_is_a_slurm_error():
    def run(argv, **kwargs):
        raise CommandError(argv, 127, "", f"{argv[0]}: command not found")

    with pytest.raises(SlurmError, match="^squeue .*command not found"):
        Slurm(run=run).job_states(["1"])


def test_node_state():
    line = "NodeName=node1 Arch=x86_64 CPUTot=2 State=IDLE+DRAIN ThreadsPerCore=1 Reason=spot interruption [root@t]"
    slurm = Slurm(run=FakeRun({("scontrol", "show", "node"): line + "\n"}))
    assert slurm.node_state("node1") == "IDLE+DRAIN"
    info = slurm.node_info("node1")
    assert info.drained and info.reason == "spot interruption [root@t]"


@pytest.mark.parametrize("out, code, expected", [("Slurmctld(primary) at head is UP\n", 0, True),
                                                 ("Slurmctld(primary) at head is DOWN\n", 1, False)],
                         ids=["up", "down"])
def test_ping(out, code, expected):
    def run(argv, ok_codes=(0,), **kwargs):
        assert code in ok_codes
        return proc.Result(list(argv), code, out, "")

    assert Slurm(run=run).ping() is expected


def test_job_states_combines_squeue_and_sacct():
    squeue = "100|100|RUNNING\n101|101|COMPLETED\n102_1|103|PENDING\n102_2|104|RUNNING\n"
    sacct = "200|COMPLETED\n201|CANCELLED by 1001\n"
    run = FakeRun({("squeue",): squeue, ("sacct",): sacct})
    states = Slurm(run=run).job_states(["100", "101", "102_2", "103", "200", "201", "300"])
    assert states == {"100": "RUNNING", "101": "COMPLETED", "102_2": "RUNNING", "103": "PENDING",
                      "200": "COMPLETED", "201": "CANCELLED", "300": "UNKNOWN"}
    assert run.calls[0][0] == ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%A|%T"]
    assert run.calls[1][0] == ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", "200,201,300"]


def test_job_states_without_accounting_is_unknown():
    argv = ["sacct"]
    run = FakeRun({("squeue",): "5|5|RUNNING\n", ("sacct",): fail(argv, "Slurm accounting storage is disabled\n")})
    assert Slurm(run=run).job_states(["5", "6"]) == {"5": "RUNNING", "6": "UNKNOWN"}


def test_job_states_never_guesses():
    down = fail(["squeue"], "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
    with pytest.raises(SlurmError, match="Unable to contact slurm controller"):
        Slurm(run=FakeRun({("squeue",): down})).job_states(["5"])
    dbd_down = fail(["sacct"], "sacct: error: Problem talking to the database: Connection refused\n")
    with pytest.raises(SlurmError, match="database"):
        Slurm(run=FakeRun({("squeue",): "", ("sacct",): dbd_down})).job_states(["5"])


def test_job_states_of_nothing_asks_nothing():
    assert Slurm(run=FakeRun({})).job_states([]) == {}


# -- the real cluster ----------------------------------------------------------------------------------------------

SEGMENT_SCRIPT = """#!/bin/bash
echo "segment node=$SLURMD_NODENAME restart=${SLURM_RESTART_COUNT:-0} runtime=$CKPT_RUNTIME_DIR store=$CKPT_STORE"
echo "job $SLURM_JOB_ID on $SLURMD_NODENAME" > "$CKPT_STORE/$USER-$SLURM_JOB_ID-$SLURMD_NODENAME"
sleep 300
"""


def read(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


@pytest.mark.slurm
def test_drain_requeue_restarts_job_on_other_node(cluster, slurm_user):
    slurm = cluster.slurm()
    out = os.path.join(cluster.user_dir(slurm_user), "segments.out")
    job = cluster.sbatch(SEGMENT_SCRIPT, user=slurm_user, extra_args=["-o", out])
    info = cluster.wait_job(job, "RUNNING", timeout=20)
    assert (info.nodes, info.user, info.restart_count, info.requeue) == ("node1", slurm_user, 0, True)
    assert info.uid == os.stat(cluster.user_dir(slurm_user)).st_uid != 0
    wait_for(lambda: "segment" in read(out), 10, "the first segment's output")

    slurm.drain_node("node1", "spot interruption (test)")
    assert "DRAIN" in slurm.node_state("node1")
    assert slurm.node_info("node1").reason.startswith("spot interruption (test)")
    slurm.requeue(job)
    info = cluster.wait_job(job, "RUNNING", timeout=40)
    assert (info.nodes, info.restart_count) == ("node2", 1)
    wait_for(lambda: read(out).count("segment") == 2, 10, "the second segment's output")

    lines = [line for line in read(out).splitlines() if line.startswith("segment")]
    store = cluster.store
    assert lines == [  # the first segment's line survived the requeue: the output file was appended, not truncated
        f"segment node=node1 restart=0 runtime={cluster.runtime_dir('node1')} store={store}",
        f"segment node=node2 restart=1 runtime={cluster.runtime_dir('node2')} store={store}",
    ]
    for node in ("node1", "node2"):  # the user's job wrote into the shared store from both nodes
        written = os.path.join(store, f"{slurm_user}-{job}-{node}")
        assert read(written) == f"job {job} on {node}\n"
        assert os.stat(written).st_uid == info.uid
    proc.run(["scancel", job], env=cluster.env())
    assert cluster.wait_job(job, "CANCELLED", timeout=20).state == "CANCELLED"


@pytest.mark.slurm
def test_job_states_for_gc(cluster, slurm_user):
    slurm = cluster.slurm()
    done = cluster.sbatch("#!/bin/bash\ntrue\n", user=slurm_user)
    array = cluster.sbatch("#!/bin/bash\ntrue\n", user=slurm_user, extra_args=["--array=1-2"])
    running = cluster.sbatch("#!/bin/bash\nsleep 300\n", user=slurm_user)
    cancelled = cluster.sbatch("#!/bin/bash\nsleep 300\n", user=slurm_user)
    pending = cluster.sbatch("#!/bin/bash\ntrue\n", user=slurm_user, extra_args=["--begin=now+1hour"])
    cluster.wait_job(done, "COMPLETED", timeout=30)
    cluster.wait_job(f"{array}_2", "COMPLETED", timeout=30)
    cluster.wait_job(cancelled, "RUNNING", timeout=30)
    proc.run(["scancel", cancelled], env=cluster.env())
    cluster.wait_job(cancelled, "CANCELLED", timeout=20)
    cluster.wait_job(running, "RUNNING", timeout=30)
    unknown = str(int(running) + 100000)
    states = slurm.job_states([done, f"{array}_1", f"{array}_2", running, cancelled, pending, unknown])
    assert states == {done: "COMPLETED", f"{array}_1": "COMPLETED", f"{array}_2": "COMPLETED", running: "RUNNING",
                      cancelled: "CANCELLED", pending: "PENDING", unknown: "UNKNOWN"}
    with pytest.raises(JobNotFound):
        slurm.job_info(unknown)
    proc.run(["scancel", running, pending], env=cluster.env())


@pytest.mark.slurm
def test_unreachable_slurm_raises(local_cluster, tmp_path):
    with open(local_cluster.conf_path, encoding="utf-8") as fh:
        conf = fh.read()
    conf = re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=9", conf) + "MessageTimeout=2\n"
    broken = tmp_path / "slurm.conf"
    broken.write_text(conf)
    slurm = Slurm(env={"SLURM_CONF": str(broken)}, timeout=15)
    assert local_cluster.slurm().ping() is True
    assert slurm.ping() is False
    with pytest.raises(SlurmError, match=r"^squeue .*(Unable to contact|connect)"):
        slurm.job_states(["1"])
    with pytest.raises(SlurmError, match=r"^scontrol show job -o 1: "):
        slurm.job_info("1")


@pytest.mark.slurm
def test_job_states_from_accounting_once_slurmctld_forgot(cluster, slurm_user):
    if not cluster.accounting:
        pytest.skip("the local cluster runs without accounting (slurmdbd or mariadb-server not installed, or "
                    "CKPT_CLUSTER_ACCOUNTING=0)")
    done = cluster.sbatch("#!/bin/bash\ntrue\n", user=slurm_user)
    cluster.wait_job(done, "COMPLETED", timeout=30)

    def forgetful_run(argv, **kwargs):  # squeue as it answers once the job is older than MinJobAge
        if os.path.basename(argv[0]) == "squeue":
            return proc.Result(list(argv), 0, "", "")
        return proc.run(argv, **kwargs)

    slurm = Slurm(run=forgetful_run, env={"SLURM_CONF": cluster.conf_path})
    # slurmctld sends the job's end to slurmdbd asynchronously
    wait_for(lambda: slurm.job_states([done])[done] == "COMPLETED", 15, "sacct to report the job COMPLETED")
    unknown = str(int(done) + 100000)
    assert slurm.job_states([done, unknown]) == {done: "COMPLETED", unknown: "UNKNOWN"}


def test_job_partitions_from_squeue_then_sacct():
    run = FakeRun({("squeue",): "100|100|sim-spot\n102_1|103|sim-spot-xl\n", ("sacct",): "200|ondemand\n"})
    assert Slurm(run=run).job_partitions(["100", "102_1", "200", "300"]) == {
        "100": "sim-spot", "102_1": "sim-spot-xl", "200": "ondemand"}
    assert run.calls[0][0] == ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%A|%P"]
    assert run.calls[1][0] == ["sacct", "-n", "-P", "-X", "-o", "JobID,Partition", "-j", "200,300"]


def test_slurm_bin_dir_from_config_then_parallelclusters_then_path(tmp_path):
    from ckpt_agent.adapters.slurm import slurm_bin_dir
    from ckpt_agent.node.config import AgentConfig

    assert slurm_bin_dir("/site/slurm/bin", default=str(tmp_path)) == "/site/slurm/bin"
    assert slurm_bin_dir("", default=str(tmp_path)) is None  # no scontrol there: PATH
    (tmp_path / "scontrol").write_text("#!/bin/sh\n")
    assert slurm_bin_dir("", default=str(tmp_path)) == str(tmp_path)
    run = FakeRun({("scontrol",): ""})
    cfg = AgentConfig(slurm_bin_dir=str(tmp_path))
    slurm = Slurm.from_config(cfg)
    slurm._run = run
    slurm.resume_node("n1")
    assert run.calls[0][0][0] == f"{tmp_path}/scontrol"
