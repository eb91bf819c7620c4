"""A real Slurm cluster on one machine: munged, slurmctld and one slurmd per simulated node, all under one workdir.

Used by the integration tests (`local_cluster` fixture in tests/conftest.py) and by `make demo`. Needs root and
Debian's slurmctld, slurmd, slurm-client and munge packages (Debian's slurmd is built with multiple-slurmd support,
so `slurmd -N node1` and `slurmd -N node2` run side by side, told apart by their ports).

    with LocalCluster("/tmp/ckpt-demo", nodes=("node1", "node2")) as cluster:
        cluster.ensure_user("alice")
        job = cluster.sbatch("#!/bin/bash\\nsleep 60\\n", user="alice")
        cluster.wait_job(job, "RUNNING")

Start-up plan (a few seconds; every wait is bounded and a failure names the daemon and the tail of its log):
  1. check the binaries and that others can traverse the workdir (jobs run as ordinary users);
  2. write the munge key, slurm.conf, cgroup.conf, the TaskProlog and the per-node environment files;
  3. start munged on its own socket (never the system one), with accounting=True MariaDB and slurmdbd, then
     slurmctld (empty state, -c), then one slurmd per node;
  4. wait for `scontrol ping`, then for every node to be IDLE.
`stop()` cancels the jobs, stops the daemons in reverse order (TERM, then KILL after 10 s) and kills any process
left that belongs to the cluster (slurmstepd and job processes outlive slurmd), waiting until they are gone. It runs
from the context manager, on a failed start, from atexit, and on SIGTERM/SIGHUP. Should the process that started the
cluster die without stopping it (SIGKILL, a crash), the cluster's watchdog stops it; `python -m
ckpt_dev.reaper stop WORKDIR` does the same by hand (see `reaper`). It deletes nothing: logs stay.

Layout and permissions under workdir (which must be traversable by others, so not under a 0700 pytest dir):
  etc/          0755  slurm.conf, cgroup.conf, task_prolog.sh, node-env/<node>.env (0644: the prolog runs as the user)
  munge/        0755  munge.socket (clients of every user connect); munge/key/ 0700 holds the key, root only
  state/        0700  StateSaveLocation;  spool/<node>: SlurmdSpoolDir;  log/ 0755: daemon logs
  run/<node>/   0755  each node's CKPT_RUNTIME_DIR (the node agent, root, owns it); run/<node>/jobs/ 1777 for
                    the registrations of users' `ckpt run` wrappers (as ckpt_agent.checkpoint.runner expects)
  store/        1777  the shared checkpoint store (like FSx): every user's job can create its own entries there
  home/<user>/  0755  a working directory per user, owned by the user (sbatch's default cwd)

slurm.conf and why each setting: see `slurm_conf`. Optional accounting (MariaDB + slurmdbd, `sacct`): `accounting`.

Per-node job environment: slurm.conf's TaskProlog runs etc/task_prolog.sh as the job's user before each task; it
prints `export NAME=value` for each line of etc/node-env/$SLURMD_NODENAME.env, which Slurm adds to the task's
environment (the batch script included). Each file holds CKPT_RUNTIME_DIR=<workdir>/run/<node>,
CKPT_STORE=<store> and any extra variables; set_node_env() rewrites it at runtime for the next job start.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

from ckpt_agent.adapters.slurm import JobInfo, Slurm
from ckpt_agent.errors import EXIT_SLURM, CkptError, CommandError
from ckpt_agent.util import proc
from ckpt_agent.util.safeio import write_atomic
from ckpt_dev import reaper, slurm_conf
from ckpt_dev.accounting import LocalAccounting, missing_binaries

log = logging.getLogger(__name__)

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "squeue", "scancel", "runuser")
START_TIMEOUT_SECONDS = 30  # each phase normally takes under 2 s; 30 s covers a loaded CI machine
STOP_TIMEOUT_SECONDS = 10  # slurmd needs ~5 s to shut down; then SIGKILL
POLL_SECONDS = 0.2
CGROUP_V1_FREEZER = reaper.CGROUP_V1_FREEZER


class ClusterError(CkptError):
    """The local cluster could not be started or did not reach the expected state in time."""

    exit_code = EXIT_SLURM


def _free_ports(count: int) -> List[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def _write(path: str, text: str, mode: int = 0o644) -> None:
    write_atomic(path, text.encode("utf-8"), mode, durable=False)


def _mkdir(path: str, mode: int) -> str:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    return path


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:]).strip()
    except OSError:
        return "(no log)"


def cgroup_v1_usable() -> bool:
    """proctrack/cgroup works here when the v1 freezer hierarchy is mounted and writable (22.05 on cgroup v2 needs
    systemd/dbus for its scope, which test machines and containers often lack)."""
    return os.path.isdir(CGROUP_V1_FREEZER) and os.access(CGROUP_V1_FREEZER, os.W_OK)


class LocalCluster:
    """A Slurm cluster of `nodes` on this host. Not thread-safe; one instance per workdir."""

    def __init__(
        self,
        workdir: str,
        nodes: Sequence[str] = ("node1", "node2"),
        *,
        shared_store: Optional[str] = None,
        cluster_name: str = "ckptdev",
        partition: str = "batch",
        cpus_per_node: Optional[int] = None,
        node_env: Optional[Mapping[str, Mapping[str, str]]] = None,
        conf_overrides: Optional[Mapping[str, str]] = None,
        proctrack: str = "auto",
        accounting: bool = False,
        start_timeout: float = START_TIMEOUT_SECONDS,
        extra_partitions: Sequence[str] = (),
        job_submit_lua: Optional[str] = None,
        cred_expire: Optional[int] = slurm_conf.CRED_EXPIRE_SECONDS,
        node_features: Optional[Mapping[str, str]] = None,
    ):
        if proctrack not in ("auto", "cgroup", "linuxproc"):
            raise ValueError("proctrack must be auto, cgroup or linuxproc")
        self.workdir = os.path.abspath(workdir)
        self.nodes = tuple(nodes)
        self.store = os.path.abspath(shared_store) if shared_store else os.path.join(self.workdir, "store")
        self.cluster_name = cluster_name
        self.partition = partition
        self.extra_partitions = tuple(extra_partitions)
        self.job_submit_lua = job_submit_lua  # text of etc/job_submit.lua; enables JobSubmitPlugins=lua
        self.cpus_per_node = int(cpus_per_node or os.cpu_count() or 1)
        self.conf_overrides = dict(conf_overrides or {})
        self.proctrack = ("cgroup" if cgroup_v1_usable() else "linuxproc") if proctrack == "auto" else proctrack
        self.start_timeout = start_timeout
        self.accounting = accounting
        self.cred_expire = cred_expire  # None: Slurm's default (120 s), as on a real cluster
        self.node_features = dict(node_features or {})  # {node: "feat1,feat2"} for slurm.conf's Features=
        self._accounting: Optional[LocalAccounting] = None
        self._node_env: Dict[str, Dict[str, str]] = {n: dict((node_env or {}).get(n, {})) for n in self.nodes}
        self._procs: Dict[str, subprocess.Popen] = {}
        self._watchdog = reaper.Watchdog(self.workdir)
        self._started = False
        self.etc_dir = os.path.join(self.workdir, "etc")
        self.log_dir = os.path.join(self.workdir, "log")
        self.conf_path = reaper.conf_path(self.workdir)
        self.munge_socket = os.path.join(self.workdir, "munge", "munge.socket")
        self.ports: Dict[str, int] = {}
        self._first_job_id = 1000 * random.randint(10, 60000)

    # -- public helpers ----------------------------------------------------------------------------------------

    def runtime_dir(self, node: str) -> str:
        """The node's CKPT_RUNTIME_DIR (where its agent and the `ckpt run` registrations live)."""
        return os.path.join(self.workdir, "run", node)

    def env(self, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """Environment for Slurm client commands against this cluster (os.environ + SLURM_CONF)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf_path
        env.update(extra or {})
        return env

    def slurm(self, **kwargs) -> Slurm:
        """A `ckpt_agent.adapters.slurm.Slurm` adapter talking to this cluster."""
        return Slurm(env={"SLURM_CONF": self.conf_path}, **kwargs)

    def scontrol(self, *args: str, ok_codes: Sequence[int] = (0,)) -> str:
        return proc.run(["scontrol", *args], env=self.env(), ok_codes=ok_codes, timeout=30).stdout

    def job_info(self, job_id) -> JobInfo:
        return self.slurm().job_info(job_id)

    @property
    def job_config(self) -> str:
        return os.path.join(self.workdir, "etc", "ckpt-job.yaml")

    def write_job_config(self, extra: Optional[Mapping[str, Any]] = None) -> None:
        """The config every job's `ckpt run` reads (CKPT_CONFIG): the cluster's key, and `extra` settings (e.g. a
        checkpoint interval for scripts that the job_submit plugin wraps)."""
        _write(self.job_config, json.dumps({**(extra or {}), "agent": {"key_file": self.key_file}}) + "\n", 0o644)

    @property
    def key_file(self) -> str:
        """The cluster's manifest-signing key (created by the node agents, or by a root job's first `ckpt run`)."""
        return os.path.join(self.workdir, "agent", "node.key")

    def node_env(self, node: str) -> Dict[str, str]:
        """What jobs on `node` get in their environment from the TaskProlog."""
        env = {"CKPT_RUNTIME_DIR": self.runtime_dir(node), "CKPT_STORE": self.store, "CKPT_CONFIG": self.job_config}
        env.update(self._node_env.get(node, {}))
        return env

    def set_node_env(self, node: str, env: Mapping[str, str]) -> None:
        """Extra variables for jobs starting on `node` from now on (replaces earlier extras)."""
        if node not in self.nodes:
            raise ValueError(f"unknown node {node!r}")
        for name, value in env.items():
            if not name.isidentifier() or "\n" in str(value):
                raise ValueError(f"bad environment entry {name!r}")
        self._node_env[node] = {k: str(v) for k, v in env.items()}
        if os.path.isdir(os.path.join(self.etc_dir, "node-env")):
            self._write_node_env(node)

    def ensure_user(self, name: str) -> tuple:
        """(uid, gid) of local user `name`, created (useradd, own group, home under /home) when missing; also
        creates the user's working directory <workdir>/home/<name>."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            proc.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", name], timeout=30)
            entry = pwd.getpwnam(name)
        home = _mkdir(os.path.join(self.workdir, "home", name), 0o755)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        return entry.pw_uid, entry.pw_gid

    def user_dir(self, user: str) -> str:
        return os.path.join(self.workdir, "home", user)

    def sbatch(
        self,
        script: Union[str, os.PathLike],
        user: Optional[str] = None,
        extra_args: Sequence[str] = (),
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> str:
        """Submit a batch script (its text, starting with "#!", or a path) as `user` (default root); the job id.

        The job runs in `cwd` (default the user's working directory) with a minimal environment: PATH, HOME,
        USER, LOGNAME, LANG and SLURM_CONF plus `env` (e.g. a PATH with the venv's `ckpt`), not the caller's
        (sbatch exports the submitting environment to the job). The TaskProlog adds the node's variables.
        """
        user = user or "root"
        uid, gid = self.ensure_user(user) if user != "root" else (0, 0)
        cwd = cwd or (self.user_dir(user) if user != "root" else _mkdir(os.path.join(self.workdir, "home", "root"),
                                                                          0o755))
        text = str(script)
        if text.startswith("#!"):
            path = os.path.join(cwd, f"job-{time.time_ns()}.sh")
            _write(path, text, 0o755)
            os.chown(path, uid, gid)
        else:
            path = os.path.abspath(text)
        argv = ["sbatch", "--parsable", *extra_args, path]
        if user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        submit_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            "HOME": pwd.getpwnam(user).pw_dir,
            "USER": user,
            "LOGNAME": user,
            "LANG": "C.UTF-8",
            "SLURM_CONF": self.conf_path,
        }
        submit_env.update(env or {})
        out = proc.run(argv, env=submit_env, cwd=cwd, timeout=30).stdout.strip()
        job_id = out.split(";")[0]
        log.info("submitted job %s as %s", job_id, user)
        return job_id

    def wait_job(self, job_id, states: Union[str, Iterable[str]], timeout: float = 60) -> JobInfo:
        """Poll until the job is in one of `states` (e.g. "RUNNING" or ("COMPLETED", "FAILED")); its JobInfo."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        slurm = self.slurm()
        info = None
        while True:
            info = slurm.job_info(job_id)
            if info.state in wanted:
                return info
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"job {job_id} did not reach {'/'.join(sorted(wanted))} within {timeout:g} s: state {info.state},"
                    f" reason {info.reason}, nodes {info.nodes or '-'}"
                )
            time.sleep(POLL_SECONDS)

    def wait_node(self, node: str, state: str, timeout: float = 30) -> str:
        """Poll until the node's state (e.g. "IDLE", "DRAIN" as a substring) matches; the full state."""
        deadline = time.monotonic() + timeout
        slurm = self.slurm()
        while True:
            current = slurm.node_state(node)
            if state in current.split("+") or state == current:
                return current
            if time.monotonic() > deadline:
                raise ClusterError(f"node {node} did not become {state} within {timeout:g} s: {current}")
            time.sleep(POLL_SECONDS)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The end of a daemon log: "slurmctld", "slurmd-node1", "munged"."""
        path = os.path.join(self.log_dir, f"{name}.log")
        return _tail(path if os.path.exists(path) else os.path.join(self.log_dir, f"{name}.out"), lines)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        if self._started:
            return self
        self._started = True
        _register_cleanup(self)
        try:
            self._check_host()
            self._write_files()
            self._watchdog.start()  # before the first daemon: from now on nothing outlives this process
            self._start_munge()
            if self._accounting is not None:
                self._accounting.start(self.cluster_name, self._spawn, self._wait)
            self._start_slurmctld()
            self._start_slurmds()
        except BaseException:
            self.stop()
            raise
        log.info("local Slurm cluster %s up: nodes %s, proctrack/%s, %s", self.cluster_name, ",".join(self.nodes),
                 self.proctrack, self.workdir)
        return self

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, kill leftover job processes and wait until all are gone. Idempotent;
        never raises."""
        if not self._started:
            return
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._cancel_all_jobs()
        # Reverse start order: the nodes together, then the controller, accounting, and munge last.
        self._terminate([name for name in self._procs if name.startswith("slurmd-")])
        for name in ("slurmctld", "slurmdbd", "mariadbd", "munged"):
            self._terminate([name])
        # slurmstepd and job processes outlive slurmd; the watchdog stays until the rest is gone
        reaper.stop_workdir(self.workdir, grace=0, exclude=[self._watchdog.pid] if self._watchdog.pid else [])
        self._procs.clear()
        self._watchdog.release()
        self._started = False
        _live.discard(self)
        log.info("local Slurm cluster %s stopped; logs in %s", self.cluster_name, self.log_dir)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start-up steps ----------------------------------------------------------------------------------------

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError("LocalCluster needs root (it starts munged, slurmctld and slurmd)")
        search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        missing = [b for b in REQUIRED_BINARIES if not shutil.which(b, path=search)]
        if missing:
            raise ClusterError(f"missing {', '.join(missing)}: install Debian packages slurmctld slurmd slurm-client "
                               "munge util-linux")
        if self.accounting and missing_binaries():
            raise ClusterError(f"accounting needs {', '.join(missing_binaries())}: install Debian packages slurmdbd "
                               "mariadb-server")
        path = self.workdir
        while True:
            mode = os.stat(path).st_mode if os.path.exists(path) else stat.S_IXOTH  # created later with 0755
            if not mode & stat.S_IXOTH:
                raise ClusterError(f"{path} is not traversable by other users (mode {stat.filemode(mode)}); jobs run "
                                   "as ordinary users and need to reach the workdir: use a directory like /tmp/x")
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent

    def _write_files(self) -> None:
        # 1. directories with the modes documented in the module docstring
        _mkdir(self.workdir, 0o755)
        for sub, mode in (("etc", 0o755), ("etc/node-env", 0o755), ("munge", 0o755), ("munge/key", 0o700),
                          ("state", 0o700), ("spool", 0o755), ("log", 0o755), ("run", 0o755), ("home", 0o755)):
            _mkdir(os.path.join(self.workdir, sub), mode)
        for node in self.nodes:
            _mkdir(self.runtime_dir(node), 0o755)
            _mkdir(os.path.join(self.runtime_dir(node), "jobs"), 0o1777)  # `ckpt run` registrations, any user
        if not os.path.isdir(self.store):
            _mkdir(self.store, 0o1777)
        # jobs' `ckpt run` config: the cluster's signing key (node agents use the same one, ckpt_dev/agents.py),
        # so a root job never creates one in this machine's /etc
        self.write_job_config()
        # 2. munge key: 1 KiB random, readable by root only, as munged insists
        key = os.path.join(self.workdir, "munge", "key", "munge.key")
        if not os.path.exists(key):
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(1024))
        # 3. Slurm configuration
        ports = _free_ports(4 + len(self.nodes))
        self.ports = {"slurmctld": ports[0], "slurmd": ports[1]}
        self.ports.update({node: ports[2 + i] for i, node in enumerate(self.nodes)})
        if self.accounting:
            self.ports.update({"mariadbd": ports[-2], "slurmdbd": ports[-1]})
            self._accounting = LocalAccounting(self.workdir, self.etc_dir, self.munge_socket, ports[-2], ports[-1])
        _write(self.conf_path, self._slurm_conf())
        if self.job_submit_lua is not None:
            _write(os.path.join(self.etc_dir, slurm_conf.JOB_SUBMIT_LUA), self.job_submit_lua)
        _write(os.path.join(self.etc_dir, "cgroup.conf"), slurm_conf.CGROUP_CONF)
        _write(os.path.join(self.etc_dir, "task_prolog.sh"), slurm_conf.task_prolog(self._node_env_dir()), 0o755)
        for node in self.nodes:
            self._write_node_env(node)

    def _node_env_dir(self) -> str:
        return os.path.join(self.etc_dir, "node-env")

    def _write_node_env(self, node: str) -> None:
        lines = [f"{k}={v}" for k, v in self.node_env(node).items()]
        _write(os.path.join(self._node_env_dir(), f"{node}.env"), "\n".join(lines) + "\n", 0o644)

    def _slurm_conf(self) -> str:
        settings = slurm_conf.settings(self.workdir, cluster_name=self.cluster_name, ports=self.ports,
                                       munge_socket=self.munge_socket, proctrack=self.proctrack,
                                       first_job_id=self._first_job_id, cred_expire=self.cred_expire)
        if self._accounting is not None:
            settings.update(self._accounting.slurm_conf_settings())
        if self.job_submit_lua is not None:
            settings.update(slurm_conf.job_submit_settings())
        settings.update(self.conf_overrides)
        return slurm_conf.render(self.workdir, settings, nodes=self.nodes, ports=self.ports,
                                 cpus_per_node=self.cpus_per_node, partition=self.partition,
                                 extra_partitions=self.extra_partitions, features=self.node_features)

    def _spawn(self, name: str, argv: List[str]) -> subprocess.Popen:
        """The one place daemons start: foreground mode, own session (Ctrl-C reaches us, not them), output to
        log/<name>.out."""
        out = open(os.path.join(self.log_dir, f"{name}.out"), "ab")
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(), cwd=self.workdir, start_new_session=True)
        finally:
            out.close()
        self._procs[name] = child
        reaper.record(self.workdir, name, child.pid)
        log.debug("started %s (pid %d): %s", name, child.pid, argv)
        return child

    def _wait(self, what: str, name: str, check, timeout: Optional[float] = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            if check():
                return
            child = self._procs.get(name)
            if child is not None and child.poll() is not None:
                raise ClusterError(f"{name} exited with {child.returncode} before {what}: {self.log_tail(name, 5)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}: {self.log_tail(name, 5)}")
            time.sleep(POLL_SECONDS)

    def _start_munge(self) -> None:
        key_dir = os.path.join(self.workdir, "munge", "key")
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key_dir}/munge.key", f"--seed-file={key_dir}/munged.seed",
                               f"--pid-file={self.workdir}/munge/munged.pid",
                               f"--log-file={self.log_dir}/munged.log", "--force"])
        self._wait("munged's socket", "munged", lambda: os.path.exists(self.munge_socket))

    def _start_slurmctld(self) -> None:
        # -c: start from empty state, so a reused workdir does not resurrect old jobs.
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", self.conf_path])
        self._wait("slurmctld to answer scontrol ping", "slurmctld", lambda: self.slurm(timeout=5).ping())

    def _start_slurmds(self) -> None:
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", self.conf_path])
        slurm = self.slurm(timeout=5)
        for node in self.nodes:
            self._wait(f"node {node} to be IDLE", f"slurmd-{node}", lambda n=node: _is_idle(slurm, n))

    # -- shutdown steps ----------------------------------------------------------------------------------------

    def _cancel_all_jobs(self) -> None:
        try:
            out = proc.run(["squeue", "-h", "-o", "%A"], env=self.env(), timeout=10).stdout.split()
            if out:
                proc.run(["scancel", *sorted(set(out))], env=self.env(), timeout=10, ok_codes=(0, 1))
                deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
                while time.monotonic() < deadline:
                    if not proc.run(["squeue", "-h", "-o", "%A"], env=self.env(), timeout=10).stdout.split():
                        break
                    time.sleep(POLL_SECONDS)
        except CommandError as e:
            log.warning("could not cancel the jobs of the local cluster: %s", e)

    def _terminate(self, names: List[str]) -> None:
        children = [(n, self._procs[n]) for n in names if n in self._procs]
        for _, child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for name, child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, child.pid)
                child.kill()
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:  # unkillable (D state): leave it rather than hang the caller
                    log.error("%s (pid %d) survived SIGKILL", name, child.pid)


def _is_idle(slurm: Slurm, node: str) -> bool:
    try:
        return slurm.node_state(node) == "IDLE"
    except CkptError:
        return False


# -- cleanup on exit and on signals --------------------------------------------------------------------------------

_live: Set[LocalCluster] = set()  # strong references: a forgotten cluster must still be stopped at exit
_cleanup_installed = False


def _stop_all() -> None:
    for cluster in list(_live):
        try:
            cluster.stop()
        except Exception:  # noqa: BLE001 (at exit, stopping the others matters more than the traceback)
            log.exception("stopping the local cluster in %s failed", cluster.workdir)


def _on_signal(signum, frame) -> None:
    _stop_all()
    sys.exit(128 + signum)  # unwinds finally blocks; atexit then finds nothing left to stop


def _register_cleanup(cluster: LocalCluster) -> None:
    """Stop every started cluster at interpreter exit and on SIGTERM/SIGHUP (SIGINT already raises
    KeyboardInterrupt, which unwinds through `with` and atexit). Handlers are only installed where nobody else
    installed one, and only from the main thread."""
    global _cleanup_installed
    _live.add(cluster)
    if _cleanup_installed:
        return
    _cleanup_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, _on_signal)
