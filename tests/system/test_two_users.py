"""Two ordinary users on one node, for real: user B can do nothing to user A's job through any `ckpt` command or
the agent's socket, and what A does to A's own checkpoints or job directory (edits, another user's checkpoint
swapped in, planted links) never makes the root agent run an edited image or touch anything outside the job."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from ckpt_helpers import REPO, require_criu, wait_for

from ckpt_dev import shared_venv
from ckpt_dev.agents import NodeAgents

pytestmark = [pytest.mark.slurm, pytest.mark.criu]

APPENDER = REPO / "tests" / "data" / "runner" / "appender.py"


@pytest.fixture(scope="module")
def agents(local_cluster):
    require_criu()
    a = NodeAgents(local_cluster, shared_venv.refresh()).start()
    yield a
    a.stop()


def as_user(user: str, *argv: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
    return subprocess.run([runuser, "-u", user, "--", *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


class UserJob:
    """A long appender job of `user` under `ckpt run`, and the environment `ckpt` commands run with on its node."""

    def __init__(self, cluster, agents, user: str, name: str, steps: int = 100000):
        self.cluster, self.agents, self.user = cluster, agents, user
        self.work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cluster.user_dir(user)))
        shutil.chown(self.work, user, user)
        script = f"""#!/bin/bash
#SBATCH --requeue --open-mode=append -o job.out -e job.err
set -euo pipefail
cd {self.work}
{agents.bin_dir}/ckpt run -- python3 {APPENDER} {steps} 0.05
"""
        self.id = cluster.sbatch(script, user=user, cwd=str(self.work))
        self.node = cluster.wait_job(self.id, "RUNNING", timeout=120).nodes
        reg = Path(cluster.runtime_dir(self.node)) / "jobs" / f"{self.id}.main.json"
        wait_for(reg.exists, 60, f"job {self.id} to register on {self.node}")
        wait_for(lambda: (self.work / "result.txt").exists(), 60, "the tool's first step")
        self.env = {"PATH": "/usr/bin:/bin", "CKPT_RUNTIME_DIR": cluster.runtime_dir(self.node),
                    "CKPT_STORE": cluster.store, "SLURM_CONF": cluster.conf_path}
        self.dir = Path(cluster.store) / self.id

    def ckpt(self, *args: str, user: str = "") -> subprocess.CompletedProcess:
        return as_user(user or self.user, f"{self.agents.bin_dir}/ckpt", *args, env=self.env)

    def checkpoint(self) -> int:
        res = self.ckpt("checkpoint", "--job-id", self.id)
        assert res.returncode == 0, res.stderr
        return int(res.stdout.strip())

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.cluster.env(), timeout=30)
        self.cluster.wait_job(self.id, ("CANCELLED", "COMPLETED", "FAILED"), timeout=120)

    def agent_request(self, user: str, payload: dict, pipes: bool = False) -> dict:
        code = ("import json, os, sys; from ckpt_agent.adapters import control\n"
                "fds = [os.pipe()[1] for _ in range(3)] if sys.argv[3] == '1' else []\n"
                "print(json.dumps(control.request(sys.argv[1], json.loads(sys.argv[2]), fds=fds)))")
        sock = f"{self.cluster.runtime_dir(self.node)}/agent.sock"
        res = as_user(user, f"{self.agents.bin_dir}/python", "-c", code, sock, json.dumps(payload),
                      "1" if pipes else "0", env=self.env)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)


@pytest.fixture
def job_a(cluster, agents, slurm_user):
    job = UserJob(cluster, agents, slurm_user, "two-users-a")
    yield job
    job.cancel()


def test_another_user_can_do_nothing_to_a_job(job_a, slurm_user, slurm_user2):
    gen = job_a.checkpoint()
    assert gen == 1
    b = slurm_user2
    # every ckpt command: refused with 77 (the agent or a job's socket) or 74 (the store), naming the owner
    for args in (("checkpoint", "--job-id", job_a.id), ("checkpoint", "--job-id", job_a.id, "--final"),
                 ("verify", "--job-id", job_a.id), ("list", "--job-id", job_a.id)):
        res = job_a.ckpt(*args, user=b)
        assert res.returncode in (77, 74), (args, res.returncode, res.stderr)
        assert slurm_user in res.stderr, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("ckpt: "), (args, res.stderr)
        assert "Traceback" not in res.stderr
    # the agent's socket, whatever the request says
    for op in ("checkpoint", "restore", "launch"):
        reply = job_a.agent_request(b, {"op": op, "job_id": job_a.id, "step": "main"}, pipes=True)
        assert not reply["ok"] and reply["exit_code"] == 77 and "belongs to uid" in reply["error"], reply
    # the store: nothing to read, nothing to delete
    assert as_user(b, "ls", str(job_a.dir)).returncode != 0
    assert as_user(b, "cat", str(job_a.dir / "events.jsonl")).returncode != 0
    assert as_user(b, "rm", "-rf", str(job_a.dir)).returncode != 0
    assert (job_a.dir / "main" / "gen-000001" / "manifest.json").is_file()
    # and the job is unharmed: A still checkpoints it, and the tool still runs
    assert job_a.checkpoint() == 2
    assert job_a.cluster.job_info(job_a.id).state == "RUNNING"


def test_links_planted_in_a_users_job_directory_lead_nowhere(job_a, tmp_path):
    """The user owns the job's store directory and can put links in it; the root agent acts there only with the
    user's file-system identity, so a link to a root-owned place gets a refusal, and nothing is written there."""
    assert job_a.checkpoint() == 1
    victim = Path("/var/tmp") / f"ckpt-victim-{job_a.id}"
    victim.mkdir(mode=0o755)
    try:
        (victim / "precious").write_text("root's\n")
        for planted in ("chunks", "main"):
            real = job_a.dir / planted
            aside = job_a.dir / f"{planted}.aside"
            as_user(job_a.user, "mv", str(real), str(aside))
            assert as_user(job_a.user, "ln", "-s", str(victim), str(real)).returncode == 0
            try:
                res = job_a.ckpt("checkpoint", "--job-id", job_a.id)
                assert res.returncode in (74, 77), (planted, res.returncode, res.stderr)
                assert "Traceback" not in res.stderr
            finally:
                as_user(job_a.user, "rm", str(real))
                as_user(job_a.user, "mv", str(aside), str(real))
            assert sorted(p.name for p in victim.iterdir()) == ["precious"], planted
            assert (victim / "precious").read_text() == "root's\n"
            assert job_a.cluster.job_info(job_a.id).state == "RUNNING"
        # a link in the working directory to a file the user cannot read is kept as a link, never as its content
        assert as_user(job_a.user, "ln", "-s", "/etc/shadow", str(job_a.work / "shadow-link")).returncode == 0
        gen = job_a.checkpoint()
        manifest = json.loads((job_a.dir / "main" / f"gen-{gen:06d}" / "manifest.json").read_text())["manifest"]
        entry = next(f for f in manifest["files"] if f["path"].endswith("shadow-link"))
        assert entry["kind"] == "symlink" and entry["target"] == "/etc/shadow"
    finally:
        shutil.rmtree(victim, ignore_errors=True)


def test_another_users_checkpoint_swapped_in_is_refused(cluster, agents, job_a, slurm_user2):
    """User A links A's step directory to user B's (a genuine, signed checkpoint of B's): the agent restores
    neither B's image for A nor anything else, and says why."""
    job_b = UserJob(cluster, agents, slurm_user2, "two-users-b")
    try:
        assert job_b.checkpoint() == 1
        assert job_a.checkpoint() == 1
        step = job_a.dir / "main"
        as_user(job_a.user, "mv", str(step), str(job_a.dir / "main.aside"))
        assert as_user(job_a.user, "ln", "-s", str(job_b.dir / "main"), str(step)).returncode == 0
        reply = job_a.agent_request(job_a.user, {"op": "restore", "job_id": job_a.id, "step": "main"}, pipes=True)
        assert not reply["ok"] and reply["exit_code"] in (74, 77), reply
        # B's checkpoint under A's job id, copied in by root as if A had had read access: refused by its manifest
        as_user(job_a.user, "rm", str(step))
        shutil.copytree(job_b.dir / "main", step, symlinks=True)
        for p in [step, *step.rglob("*")]:
            shutil.chown(p, job_a.user, job_a.user)
        reply = job_a.agent_request(job_a.user, {"op": "restore", "job_id": job_a.id, "step": "main"}, pipes=True)
        assert not reply["ok"] and reply["exit_code"] in (65, 77), reply
        assert "uid" in reply["error"] or "signature" in reply["error"] or "damaged" in reply["error"], reply
    finally:
        job_b.cancel()


def test_an_agent_restart_during_a_job_loses_nothing(cluster, agents, slurm_user):
    """Restart the node agent while a user's job runs (as `systemctl restart` or Restart= would), then a Spot
    notice: the job is still known, its final checkpoint is taken and it is requeued and resumed."""
    job = UserJob(cluster, agents, slurm_user, "agent-restart")
    try:
        assert job.checkpoint() == 1
        agents.restart(job.node)
        assert job.checkpoint() == 2, "the restarted agent serves the running job"
        agents.imds[job.node].inject_spot_notice("terminate", seconds_from_now=120)
        try:
            cluster.wait_node(job.node, "DRAIN", timeout=60)
            wait_for(lambda: any(e.get("event") == "requeued" for e in _events(job.dir)), 120, "the requeue")
            kinds = [e["event"] for e in _events(job.dir)]
            final = [e for e in _events(job.dir) if e["event"] == "checkpoint_committed" and e.get("final")]
            assert final, kinds
            assert kinds.index("checkpoint_committed") < kinds.index("requeued")
        finally:
            agents.imds[job.node].clear()
        info = cluster.wait_job(job.id, "RUNNING", timeout=300)
        assert info.restart_count >= 1
        wait_for(lambda: "ckpt: resumed job" in _text(job.work / "job.err"), 120, "the resume")
        assert "from checkpoint 3" in _text(job.work / "job.err")
    finally:
        job.cancel()


def _events(job_dir: Path) -> list:
    try:
        lines = (job_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
