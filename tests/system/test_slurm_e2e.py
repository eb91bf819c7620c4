"""End to end on a real local Slurm cluster: ordinary users' jobs under `ckpt run`, a node agent per node with its
own IMDS endpoint, one shared store. A Spot notice on node1 moves a real ngspice job to node2, and the privilege
boundary holds for real local users."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from ckpt_helpers import REPO, require_criu, wait_for, written_only_here

from ckpt_agent.store import event_names as ev
from ckpt_agent.store.generations import CheckpointStore
from ckpt_dev import shared_venv
from ckpt_dev.agents import NodeAgents
from ckpt_dev.demo import NETLIST, ngspice_seconds_per_ns, stop_time_ns, with_stop_time

pytestmark = [pytest.mark.slurm, pytest.mark.criu]


@pytest.fixture(scope="module")
def agents(local_cluster):
    require_criu()
    bin_dir = shared_venv.refresh()
    a = NodeAgents(local_cluster, bin_dir).start()
    yield a
    a.stop()


@pytest.fixture(autouse=True)
def _no_notice_left(request):
    """After each test, also a failed one: no Spot notice left pending for the next test's nodes."""
    a = request.getfixturevalue("agents") if "agents" in request.fixturenames else None
    yield
    for imds in (a.imds.values() if a else ()):
        imds.clear()


# Where ngspice is so slow that the whole transient would take longer than this, the test simulates less. The kernel
# check's emulated guest does floating point in software: in one CI run the whole transient took more than 300 s there,
# where the dev VM takes 6.6 s. The job's interval is a fifth of the reference run, so its checkpoints, notice and
# restore keep their share of the run; a minute and a half leaves room for them even at emulated speed.
REFERENCE_CAP_SECONDS = 90.0


def ringosc_for_this_machine(probe_dir: Path) -> tuple[str, float]:
    """The ring oscillator's netlist and the seconds its run is expected to take here: the example's whole transient,
    or less where one calibration run (ngspice_seconds_per_ns) says that the whole would outlast
    REFERENCE_CAP_SECONDS."""
    netlist = NETLIST.read_text()
    whole_ns = stop_time_ns(netlist)
    projected = ngspice_seconds_per_ns(probe_dir, runs=1) * whole_ns
    if projected <= REFERENCE_CAP_SECONDS:
        return netlist, projected
    stop_ns = max(50, round(whole_ns * REFERENCE_CAP_SECONDS / projected / 50) * 50)
    return with_stop_time(netlist, stop_ns), projected * stop_ns / whole_ns


def job_script(bin_dir: str, workdir: Path, tool: str, out: str = "job.out", err: str = "job.err",
               interval: float = 0) -> str:
    every = f"--interval {interval:.1f} " if interval else ""
    return f"""#!/bin/bash
#SBATCH --requeue --open-mode=append -o {out} -e {err}
set -euo pipefail
cd {workdir}
{bin_dir}/ckpt run {every}-- {tool}
"""


def committed(store: str, job: str, final: bool) -> list:
    """The job's committed checkpoints (periodic or final) so far, from its events."""
    return [e for e in CheckpointStore(store).events(job)
            if e["event"] == "checkpoint_committed" and bool(e.get("final")) == final]


def ended(store: str, job: str) -> list:
    """The job's segments that ended so far (its tool exited, failed or was killed), from its events."""
    return [e for e in CheckpointStore(store).events(job) if e["event"] == ev.SEGMENT_ENDED]


def user_workdir(cluster, user: str, name: str) -> Path:
    d = Path(cluster.user_dir(user)) / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.chown(d, user, user)
    return d


def as_user(user: str, *argv: str, env=None) -> subprocess.CompletedProcess:
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
    return subprocess.run([runuser, "-u", user, "--", *argv], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("submitter", ["ordinary-user", "root"])
def test_spot_notice_moves_an_ngspice_job_to_another_node(cluster, agents, slurm_user, tmp_path, submitter):
    """The notice comes once a periodic checkpoint has committed, with checkpoints every fifth of the uninterrupted
    run's duration here (its own calibration): the job is mid-run then, on a fast or a slow machine alike."""
    user = slurm_user if submitter == "ordinary-user" else "root"
    ref = tmp_path / "ref"
    ref.mkdir()
    netlist, expected = ringosc_for_this_machine(ref)
    (ref / "ringosc.cir").write_text(netlist)
    t0 = time.monotonic()
    ref_out = subprocess.run(["ngspice", "-b", "ringosc.cir"], cwd=ref, capture_output=True, check=True,
                             timeout=expected * 10 + 60).stdout
    full = time.monotonic() - t0
    step_net = max(60.0, full)  # for Slurm's and the agent's steps: a minute here, more where everything is slow

    work = user_workdir(cluster, user, f"sim-{submitter}")
    (work / "ringosc.cir").write_text(netlist)
    shutil.chown(work / "ringosc.cir", user, user)
    job = cluster.sbatch(job_script(agents.bin_dir, work, "ngspice -b ringosc.cir", interval=max(1.0, full / 5)),
                         user=user, cwd=str(work))
    info = cluster.wait_job(job, "RUNNING", timeout=step_net)
    assert info.nodes == "node1"
    reg = Path(cluster.runtime_dir("node1")) / "jobs" / f"{job}.main.json"
    wait_for(reg.exists, step_net, "the wrapper to register on node1")
    # or the tool ended first (it failed, or outran the interval): then say so at once, with its stderr
    wait_for(lambda: committed(cluster.store, job, final=False) or ended(cluster.store, job),
             full * 3 + 60, "a periodic checkpoint on node1")
    gone = ended(cluster.store, job)
    assert not gone, ("the job ended before any periodic checkpoint", gone, (work / "job.err").read_text())
    assert cluster.job_info(job).state == "RUNNING"

    agents.imds["node1"].inject_spot_notice("terminate", seconds_from_now=120)
    cluster.wait_node("node1", "DRAIN", timeout=step_net)
    # the rest of the run, a final checkpoint and a restore: generous, as these weigh more where the transient was cut
    done = cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=int(full * 5) + 60)
    assert done.state == "COMPLETED", (done, (work / "job.err").read_text(), agents.log_tail("node1"))
    assert done.restart_count == 1
    assert done.nodes == "node2"
    assert (work / "result.txt").read_bytes() == (ref / "result.txt").read_bytes()
    assert (work / "job.out").read_bytes() == ref_out, "the output file must read as one uninterrupted run"
    err = (work / "job.err").read_text()
    final = committed(cluster.store, job, final=True)
    assert len(final) == 1 and final[0]["node"] == "node1", final
    assert f"ckpt: resumed job {job} step main from checkpoint {final[0]['generation']}" in err, err
    assert "restart count 1" in err
    events = [json.loads(x) for x in (Path(cluster.store) / job / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    for kind in ("notice_received", "drained", "checkpoint_committed", "requeued", "restored"):
        assert kind in kinds, kinds
    assert kinds.index("checkpoint_committed") < kinds.index("requeued") < kinds.index("restored")
    restored = next(e for e in events if e["event"] == "restored")
    assert restored["node"] == "node2" and restored["instance_id"] == agents.imds["node2"].instance_id
    # the restored tree was armed before it ran (by the agent for a user, by the wrapper for root): with dirty tracking
    # here, the first checkpoint on node2 sent only the pages written since the restore
    after = [e for e in events[kinds.index("restored"):] if e["event"] == "checkpoint_committed"]
    assert after and all(e["node"] == "node2" for e in after), after  # about four intervals of work were left
    if written_only_here():
        assert after[0]["pages_unchanged"] > 0, after[0]


def test_privilege_boundary_for_ordinary_users(cluster, agents, slurm_user, slurm_user2, tmp_path):
    """The agent starts an ordinary user's tool with exactly the job's uid, gids and no capability, inside the
    job's cgroups; it refuses another user, and it restores only checkpoints it signed for that very user; other
    users cannot read a job's store directory."""
    work = user_workdir(cluster, slurm_user, "long")
    tool = f"python3 {REPO / 'tests' / 'data' / 'runner' / 'appender.py'} 600 0.1"
    job = cluster.sbatch(job_script(agents.bin_dir, work, tool), user=slurm_user, cwd=str(work))
    node = cluster.wait_job(job, "RUNNING", timeout=60).nodes
    rt1 = cluster.runtime_dir(node)
    reg_path = Path(rt1) / "jobs" / f"{job}.main.json"
    wait_for(reg_path.exists, 60, f"registration on {node}")
    reg = json.loads(reg_path.read_text())
    wrapper = _status(reg["pid"])
    tool_pid = wait_for(lambda: _children(reg["init_pid"]), 30, "the tool")[0]
    # the init's child drops its capabilities and then execs the tool: look once the exec has happened (until then
    # the child's command line is the init's, nsinit.py with the tool's argv after it)
    wait_for(lambda: _cmdline(tool_pid).startswith(b"python3\0") and b"nsinit.py" not in _cmdline(tool_pid), 30,
             "the tool to exec")
    st = _status(tool_pid)
    assert wrapper["Uid"].split()[0] != "0"
    assert st["Uid"] == wrapper["Uid"] and st["Gid"] == wrapper["Gid"] and st["Groups"] == wrapper["Groups"]
    for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(st[caps], 16) == 0, (caps, st[caps])
    init = _status(reg["init_pid"])
    assert init["Uid"] == wrapper["Uid"]
    assert int(init["CapEff"], 16) == 1 << 21, "the namespace init keeps CAP_SYS_ADMIN only (see nsinit.py)"
    assert _cgroups(tool_pid) == _cgroups(reg["pid"]), "the tool must sit in the job's cgroups"
    if cluster.proctrack == "cgroup":
        assert f"job_{job}/" in "\n".join(_cgroups(tool_pid))

    user_env = {"PATH": "/usr/bin:/bin", "CKPT_RUNTIME_DIR": rt1, "CKPT_STORE": cluster.store,
                "SLURM_CONF": cluster.conf_path}
    sock = f"{rt1}/agent.sock"
    # another user can ask neither the agent nor the wrapper to act on the job
    for op in ("checkpoint", "restore", "launch"):
        reply = _agent_request(agents.bin_dir, slurm_user2, sock, {"op": op, "job_id": job, "step": "main",
                                                                   "init_pid": reg["init_pid"]}, user_env)
        assert not reply["ok"] and reply["exit_code"] == 77 and "belongs to uid" in reply["error"], reply
    res = as_user(slurm_user2, f"{agents.bin_dir}/ckpt", "checkpoint", "--job-id", job, env=user_env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    # the job's store directory is the user's alone
    jobdir = Path(cluster.store) / job
    wait_for((jobdir / "events.jsonl").exists, 30, "the job's first event")
    assert (jobdir.stat().st_mode & 0o777) == 0o700 and jobdir.stat().st_uid == int(wrapper["Uid"].split()[0])
    assert as_user(slurm_user2, "ls", str(jobdir)).returncode != 0
    assert as_user(slurm_user2, "cat", str(jobdir / "events.jsonl")).returncode != 0
    assert as_user(slurm_user, "cat", str(jobdir / "events.jsonl")).returncode == 0

    # restores: only a checkpoint the agent signed, for this user
    from ckpt_agent.store.generations import CheckpointStore, Signer
    from ckpt_agent.store.manifest import parse

    signed = CheckpointStore(cluster.store, Signer(Path(agents.key).read_bytes().strip()))
    step_dir = jobdir / "main"

    def plant(manifest_uid, sign=True, tamper=None):
        for old in step_dir.glob("gen-*"):
            shutil.rmtree(old)
        number, partial = signed.begin(job, "main")
        manifest = {"format": 1, "job_id": job, "step": "main", "generation": number, "created": "now",
                    "uid": manifest_uid, "gid": manifest_uid, "images": [], "files": [], "pipes": {}}
        gen = (signed if sign else CheckpointStore(cluster.store)).commit(partial, number, parse(manifest, "test"))
        if tamper:
            path = Path(gen.manifest_path)
            path.write_text(path.read_text().replace(*tamper))

    uid = int(wrapper["Uid"].split()[0])
    cases = [  # a genuine checkpoint of root's is not this user's to restore (77); an edited or unsigned one is
        # damaged (65: no intact generation is left to fall back to)
        (dict(manifest_uid=0), 77, "belongs to uid 0"),
        (dict(manifest_uid=0, tamper=('"uid":0', f'"uid":{uid}')), 65, "signature does not match"),
        (dict(manifest_uid=uid, sign=False), 65, "not signed by the agent"),
    ]
    for kwargs, code, expected in cases:
        plant(**kwargs)
        reply = _agent_request(agents.bin_dir, slurm_user, sock, {"op": "restore", "job_id": job, "step": "main"},
                               user_env, pipes=True)
        assert not reply["ok"] and reply["exit_code"] == code and expected in reply["error"], (kwargs, reply)
    subprocess.run(["scancel", job], env=cluster.env(), check=True, timeout=30)
    cluster.wait_job(job, ("CANCELLED", "COMPLETED", "FAILED"), timeout=60)
    wait_for(lambda: not Path(f"/proc/{tool_pid}").exists(), 60, "scancel to end the tool")


def _agent_request(bin_dir, user, sock, payload, env, pipes=False) -> dict:
    """Send one request to the agent as `user` (the kernel tells the agent who asks)."""
    code = ("import json, os, sys; from ckpt_agent.adapters import control\n"
            "fds = [os.pipe()[1] for _ in range(3)] if sys.argv[3] == '1' else []\n"
            "print(json.dumps(control.request(sys.argv[1], json.loads(sys.argv[2]), fds=fds)))")
    res = as_user(user, f"{bin_dir}/python", "-c", code, sock, json.dumps(payload), "1" if pipes else "0",
                  env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _children(pid: int) -> list:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cgroups(pid: int) -> list:
    return sorted(Path(f"/proc/{pid}/cgroup").read_text().splitlines())


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
