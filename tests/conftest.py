"""Shared fixtures. Other engineers' tests may use them; the names below are a stable interface.

- `imds_server`: a started `ckpt_agent.devcluster.imds_server.ImdsServer` on 127.0.0.1 (ephemeral port), one per
  test; `imds_server.url` is the base URL for `ImdsClient` or $AWS_EC2_METADATA_SERVICE_ENDPOINT. Inject with
  `inject_spot_notice(action, seconds_from_now)`, `inject_rebalance()`, `clear()`, `fail_next(n, status)`,
  `delay_next(n, seconds)`, `expire_tokens()`; observe with `count(path, method)` / `request_counts`.
- `imds_client`: an `ImdsClient` for `imds_server` with short timeouts (timeout=0.5 s, tries=1).
- `local_cluster` (session scope; tests using it carry the marker `slurm`): a started
  `ckpt_agent.devcluster.slurm_cluster.LocalCluster` with nodes node1 and node2, started once per pytest session
  and stopped at its end (start-up: 1 s, 3 s with accounting, on this machine). It runs with Slurm accounting
  (MariaDB + slurmdbd, so `sacct` works) when slurmdbd and mariadb-server are installed and
  CKPT_CLUSTER_ACCOUNTING is not "0"; `local_cluster.accounting` says which. Its workdir, /tmp/ckpt-slurm-XXXX, is
  removed at the end unless a test failed or CKPT_KEEP_CLUSTER=1 (then it is kept for its logs and its path is
  printed). The shared store is `local_cluster.store`, node N's runtime dir `local_cluster.runtime_dir(N)`.
  Tests that drain nodes or change per-node environment must undo it (`resume_node`, `set_node_env(node, {})`);
  the `cluster` fixture below does that for them.
- `cluster`: the session's `local_cluster`, after a check that both nodes are IDLE (resumes drained nodes and
  cancels leftover jobs from an earlier test) and with per-node extras reset.
- `pool`: a 4-thread executor for chunk work; `chunks`: an empty `ChunkStore` in the test's tmp dir.
- `slurm_user`: the name of an ordinary local user ("ckpt-user1", created if missing) for submitting jobs;
  `slurm_user2` a second one ("ckpt-user2").

Tests needing the cluster skip (with the reason) when not root or when Slurm/munge are not installed.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile

import pytest

from ckpt_agent.chunkstore import ChunkStore
from ckpt_agent.devcluster.imds_server import ImdsServer
from ckpt_agent.imds import ImdsClient

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "squeue", "runuser", "useradd")


@pytest.fixture
def imds_server():
    with ImdsServer(instance_id="i-0feedfacecafe0001", instance_type="c6i.large",
                    availability_zone="us-east-1a") as server:
        yield server


@pytest.fixture
def imds_client(imds_server):
    return ImdsClient(imds_server.url, timeout=0.5, tries=1)


def _slurm_skip_reason():
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root"
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [b for b in SLURM_BINARIES if not shutil.which(b, path=search)]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: slurmctld slurmd slurm-client munge)"
    return None


@pytest.fixture(scope="session")
def local_cluster(request):
    reason = _slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    from ckpt_agent.devcluster import accounting
    from ckpt_agent.devcluster.slurm_cluster import LocalCluster

    workdir = tempfile.mkdtemp(prefix="ckpt-slurm-", dir="/tmp")
    os.chmod(workdir, 0o755)  # jobs run as ordinary users and must traverse it
    with_accounting = not accounting.missing_binaries() and os.environ.get("CKPT_CLUSTER_ACCOUNTING") != "0"
    cluster = LocalCluster(workdir, nodes=("node1", "node2"), accounting=with_accounting)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if request.session.testsfailed or os.environ.get("CKPT_KEEP_CLUSTER") == "1":
            print(f"\nlocal Slurm cluster kept for inspection: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def cluster(local_cluster):
    """The session cluster in a clean state: no jobs left, both nodes IDLE, no per-node extras."""
    slurm = local_cluster.slurm()
    leftovers = local_cluster.scontrol("show", "job", "-o").splitlines()
    live = [line.split()[0].split("=")[1] for line in leftovers
            if "JobState=RUNNING" in line or "JobState=PENDING" in line or "JobState=COMPLETING" in line]
    if live:
        from ckpt_agent import proc

        proc.run(["scancel", *live], env=local_cluster.env(), ok_codes=(0, 1))
    for node in local_cluster.nodes:
        local_cluster.set_node_env(node, {})
        if slurm.node_info(node).drained:
            slurm.resume_node(node)
    for node in local_cluster.nodes:
        local_cluster.wait_node(node, "IDLE", timeout=30)
    return local_cluster


@pytest.fixture(scope="session")
def slurm_user(local_cluster):
    local_cluster.ensure_user("ckpt-user1")
    return "ckpt-user1"


@pytest.fixture(scope="session")
def slurm_user2(local_cluster):
    local_cluster.ensure_user("ckpt-user2")
    return "ckpt-user2"


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as p:
        yield p


@pytest.fixture
def chunks(tmp_path):
    return ChunkStore(str(tmp_path / "chunks"))
