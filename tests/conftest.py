"""Shared fixtures. Other engineers' tests may use them; the names below are a stable interface.

- `imds_server`: a started `ckpt_dev.imds_server.ImdsServer` on 127.0.0.1 (ephemeral port), one per
  test; `imds_server.url` is the base URL for `ImdsClient` or $AWS_EC2_METADATA_SERVICE_ENDPOINT. Inject with
  `inject_spot_notice(action, seconds_from_now)`, `inject_rebalance()`, `clear()`, `fail_next(n, status)`,
  `delay_next(n, seconds)`, `expire_tokens()`; observe with `count(path, method)` / `request_counts`.
- `imds_client`: an `ImdsClient` for `imds_server` with short timeouts (timeout=0.5 s, tries=1).
- `local_cluster` (session scope; tests using it carry the marker `slurm`): a started
  `ckpt_dev.slurm_cluster.LocalCluster` with nodes node1 and node2, started once per pytest session
  and stopped at its end (start-up: 1 s, 3 s with accounting, on this machine). It runs with Slurm accounting
  (MariaDB + slurmdbd, so `sacct` works) when slurmdbd and mariadb-server are installed and
  CKPT_CLUSTER_ACCOUNTING is not "0"; `local_cluster.accounting` says which. Its workdir, /tmp/ckpt-slurm-XXXX, is
  removed at the end unless a test failed or CKPT_KEEP_CLUSTER=1 (then it is kept for its logs and its path is
  printed). The shared store is `local_cluster.store`, node N's runtime dir `local_cluster.runtime_dir(N)`.
  Tests that drain nodes or change per-node environment must undo it (`resume_node`, `set_node_env(node, {})`);
  the `cluster` fixture below does that for them.
- `cluster`: the session's `local_cluster`, after a check that both nodes are IDLE (resumes drained nodes and
  cancels leftover jobs from an earlier test) and with per-node extras reset.
- `ck`: for tests that drive the real `ckpt` command as root with real CRIU: (environment, store dir, runtime dir),
  an empty store and an environment whose config keeps the signing key in the test's tmp dir (`ckpt_env`).
- `pool`: a 4-thread executor for chunk work; `chunks`: an empty `ChunkStore` in the test's tmp dir.
- Every test's stores (in the test's own process) take bytes at STORE_BANDWIDTH_IN_TESTS, slower than zstd, as a
  reclaimed node's share of FSx does, so whether a chunk is compressed (chunks.choose_level) does not depend on how
  fast this machine's disk is; a test of the measurement itself carries the marker `real_store_bandwidth`.
- `slurm_user`: the name of an ordinary local user ("ckpt-user1", created if missing) for submitting jobs;
  `slurm_user2` a second one ("ckpt-user2").

Tests needing the cluster skip (with the reason) when not root or when Slurm/munge are not installed.

No daemon outlives the session: at its start every process the suite starts is marked (PYTEST_CKPT_SESSION in
the environment, which every cluster daemon, agent and demo inherits). At its end, after the session fixtures are
torn down, any slurmctld, slurmd, slurmstepd, munged, slurmdbd, mariadbd or `ckpt agent` that carries this
session's mark and did not run before the session is killed, and the run fails, naming them. Other sessions'
clusters on the same machine (another engineer's, the system's) are left alone.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from typing import Dict, Set

import pytest

from ckpt_agent.adapters.imds import ImdsClient
from ckpt_agent.store import chunks as chunkstore
from ckpt_agent.store.chunks import ChunkStore
from ckpt_dev.imds_server import ImdsServer

# checkpoint/test_transparent.py imports test_bootstrap's Node and its `bundle` fixture: importable also when only
# a subset of the suite runs (pytest puts a test's folder on sys.path only when it collects a test from there)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap"))

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "squeue", "runuser", "useradd")
SESSION_MARK = "PYTEST_CKPT_SESSION"  # not CKPT_*: tests grep jobs' environments for those
DAEMON_NAMES = ("slurmctld", "slurmd", "slurmstepd", "munged", "slurmdbd", "mariadbd")  # pgrep -x
DAEMON_PATTERNS = ("ckpt agent",)  # pgrep -f
_before_key = pytest.StashKey()  # (this session's mark, the daemons that ran before it)


def _pgrep(*args: str) -> Set[int]:
    res = subprocess.run(["pgrep", *args], capture_output=True, text=True, timeout=30)
    if res.returncode not in (0, 1):  # 1: nothing matched
        raise RuntimeError(f"pgrep {' '.join(args)} failed: {res.stderr.strip()}")
    return {int(p) for p in res.stdout.split()}


def _daemons() -> Dict[int, str]:
    """pid -> what matched, for every process that looks like a daemon of ours, whoever started it."""
    found = {}
    for name in DAEMON_NAMES:
        found.update(dict.fromkeys(_pgrep("-x", name), name))
    for pattern in DAEMON_PATTERNS:
        found.update(dict.fromkeys(_pgrep("-f", pattern), pattern))
    found.pop(os.getpid(), None)
    return found


def _carries(pid: int, mark: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{SESSION_MARK}={mark}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


# The machine's own configuration directory: tests keep keys and configs in their tmp dirs, never here.
MACHINE_CONFIG_DIR = "/etc/ckpt-agent"
_etc_key = pytest.StashKey()


def pytest_configure(config):
    # imported here: tests/ckpt_dev/test_session_check.py loads this module from a session of its own, where the
    # suite's helpers are not importable (it takes only the session hooks)
    from ckpt_helpers import backstop

    backstop(1)  # a malformed CKPT_TEST_BACKSTOP_SCALE stops the run before any test, in one line


def pytest_sessionstart(session):
    mark = uuid.uuid4().hex
    os.environ[SESSION_MARK] = mark
    session.config.stash[_before_key] = (mark, set(_daemons()))
    session.config.stash[_etc_key] = os.path.exists(MACHINE_CONFIG_DIR)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _check_daemons(session)
    _check_machine_config(session)


def _check_machine_config(session) -> None:
    """A root `ckpt run` whose config names no key creates one in /etc/ckpt-agent at first use: a test doing so
    writes into this machine's configuration. Fail the session when the suite created that directory."""
    if _etc_key not in session.config.stash or session.config.stash[_etc_key]:
        return
    if os.path.exists(MACHINE_CONFIG_DIR):
        _fail_session(session, "files written into this machine's /etc",
                      f"the test session created {MACHINE_CONFIG_DIR} "
                      f"({', '.join(sorted(os.listdir(MACHINE_CONFIG_DIR)))}): a test ran root's `ckpt run` without "
                      "a config that keeps its key in the test's tmp dir")


def _fail_session(session, title: str, text: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", title, red=True)
        reporter.write_line(text)
    else:
        print(text)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _check_daemons(session) -> None:
    """(After pytest's own sessionfinish has torn down the session fixtures: this hook runs trylast.)"""
    if _before_key not in session.config.stash:
        return
    from ckpt_dev import reaper

    mark, before = session.config.stash[_before_key]
    leftovers = {pid: what for pid, what in _daemons().items() if pid not in before and _carries(pid, mark)}
    if not leftovers:
        return
    lines = [f"{pid} {what}: {_cmdline(pid)}" for pid, what in sorted(leftovers.items())]
    survivors = reaper.kill(leftovers)
    _fail_session(session, "daemons left behind by the suite",
                  "the test session left daemons running; they are killed now"
                  + (f" (these survived SIGKILL: {survivors})" if survivors else "") + ":\n  " + "\n  ".join(lines))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "(gone)"



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
    from ckpt_dev import accounting
    from ckpt_dev.slurm_cluster import LocalCluster

    workdir = tempfile.mkdtemp(prefix="ckpt-slurm-", dir="/tmp")
    os.chmod(workdir, 0o755)  # jobs run as ordinary users and must traverse it
    with_accounting = not accounting.missing_binaries() and os.environ.get("CKPT_CLUSTER_ACCOUNTING") != "0"
    cluster = LocalCluster(workdir, nodes=("node1", "node2"), accounting=with_accounting)
    cluster.start()
    from ckpt_helpers import keep_or_remove

    try:
        yield cluster
    finally:
        cluster.stop()
        keep_or_remove(request, workdir, "local Slurm cluster")


@pytest.fixture
def cluster(local_cluster):
    """The session cluster in a clean state: no jobs left, both nodes IDLE, no per-node extras."""
    slurm = local_cluster.slurm()
    leftovers = local_cluster.scontrol("show", "job", "-o").splitlines()
    live = [line.split()[0].split("=")[1] for line in leftovers
            if "JobState=RUNNING" in line or "JobState=PENDING" in line or "JobState=COMPLETING" in line]
    if live:
        from ckpt_agent.util import proc

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
def ck(tmp_path):
    from ckpt_helpers import ckpt_env, require_criu

    require_criu()
    store, runtime = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    return ckpt_env(store, runtime), store, runtime


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as p:
        yield p


@pytest.fixture
def chunks(tmp_path):
    return ChunkStore(str(tmp_path / "chunks"))


STORE_BANDWIDTH_IN_TESTS = 1e6  # bytes/s: below the speed of every zstd level, even in an emulated guest


@pytest.fixture(autouse=True)
def _store_slower_than_zstd(request, monkeypatch):
    if request.node.get_closest_marker("real_store_bandwidth") is None:
        monkeypatch.setattr(chunkstore, "store_bandwidth", lambda _root: STORE_BANDWIDTH_IN_TESTS)
