"""An emulated ParallelCluster node: a clean Debian 12 root (mmdebstrap) laid out as ParallelCluster lays out its
nodes, with its own munged, slurmctld and slurmd running inside it (chroot).

The layout that matters (aws-parallelcluster-cookbook, see docs/cluster-setup.md):
- Slurm's commands only in /opt/slurm/bin (ParallelCluster builds Slurm with --prefix=/opt/slurm); only
  /etc/profile.d/slurm.sh adds that directory to PATH;
- /etc/parallelcluster/cfnconfig and slurm_plugin/slurm_nodename; the Slurm node name is not the host name;
- the head node's /opt/parallelcluster/shared (here the same root plays head and compute node);
- no systemd: units are run by a small runner that reads them (`unit_command`).

Downloaded .debs are cached in DEB_CACHE (never anything built); the root itself lives for one test session.
Working on the test: CKPT_TEST_NODE_ROOT=<a root built and mounted by an earlier `EmulatedNode.build()`> reuses it
(and keeps it).
Every mount is undone (lazily, then checked against /proc/self/mountinfo) before the root is removed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ckpt_agent.adapters.slurm import Slurm
from ckpt_agent.util import proc
from ckpt_dev import slurm_conf

DEB_CACHE = "/var/cache/ckpt-node-test/debs"
NODE_NAME = "sim-spot-dy-nodes-1"  # ParallelCluster's <queue>-<dy|st>-<compute resource>-<n>
QUEUE = "sim-spot"
USER = "ckpt-nodeuser"
SLURM_BIN = "/opt/slurm/bin"
TEST_BIN = "/usr/local/lib/ckpt-test"  # the fakes: systemctl (no systemd here) and an aws CLI with an endpoint
# What a node has from its AMI: Python with venv, Slurm, munge, the AWS CLI, and CRIU's runtime libraries
# (install-criu.sh's APT_RUNTIME_DEPS: a cached CRIU build needs them and nothing else).
PACKAGES = ("ca-certificates python3 python3-venv slurmctld slurmd slurm-client munge awscli iproute2 procps "
            "libprotobuf-c1 libnl-3-200 libnet1 libcap2 libbsd0 libgnutls30 libnftables1 libuuid1").split()
MMDEBSTRAP_TIMEOUT_SECONDS = 1200  # a first run downloads ~100 MB of packages

FAKE_SYSTEMCTL = """#!/bin/sh
# No systemd in this root: record what the bootstrap asks for; nothing is enabled or active yet.
echo "systemctl $*" >>/var/log/fake-systemctl.log
case "$1" in is-enabled|is-active) exit 1 ;; esac
exit 0
"""
FAKE_AWS = """#!/bin/sh
# Debian's AWS CLI (2.9) predates AWS_ENDPOINT_URL: pass the loopback S3 endpoint explicitly.
exec /usr/bin/aws --endpoint-url "$CKPT_TEST_S3" "$@"
"""
PROFILE_SLURM = """# as ParallelCluster's cookbook writes it (recipes/config.rb)
PATH=$PATH:/opt/slurm/bin
MANPATH=$MANPATH:/opt/slurm/share/man
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_command(unit_text: str) -> Tuple[List[str], Dict[str, str], Dict[str, str]]:
    """(ExecStart argv, Environment= assignments, every other [Service] key) of a unit file, as systemd reads them."""
    argv: List[str] = []
    env: Dict[str, str] = {}
    other: Dict[str, str] = {}
    section = ""
    for line in unit_text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section != "[Service]":
            continue
        if key == "ExecStart":
            argv = shlex.split(value)
        elif key == "Environment":
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                env[name] = val
        else:
            other[key] = value
    if not argv:
        raise AssertionError("no ExecStart= in the unit")
    return argv, env, other


class EmulatedNode:
    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: Dict[str, subprocess.Popen] = {}
        self.mounted: List[str] = []
        self.keep = False

    # -- building -------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls) -> EmulatedNode:
        kept = os.environ.get("CKPT_TEST_NODE_ROOT")  # working on this test: a root built (and mounted) before
        if kept:
            node = cls(kept)
            node.keep = True
            return node
        root = tempfile.mkdtemp(prefix="ckpt-node-", dir="/var/tmp")
        node = cls(os.path.join(root, "root"))
        os.makedirs(DEB_CACHE, exist_ok=True)
        proc.run([
            "mmdebstrap", "--variant=apt", "--skip=essential/unlink", "--skip=download/empty",
            f"--include={','.join(PACKAGES)}",
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
            f"--setup-hook=sync-in {DEB_CACHE} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {DEB_CACHE}",
            "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
            "bookworm", node.root,
        ], timeout=MMDEBSTRAP_TIMEOUT_SECONDS)
        node._layout()
        node._mount()
        return node

    def path(self, rel: str) -> Path:
        return Path(self.root) / rel.lstrip("/")

    def write(self, rel: str, text: str, mode: int = 0o644) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)

    def _layout(self) -> None:
        # 1. Slurm's commands only in /opt/slurm/bin, as ParallelCluster installs them.
        out = self.chroot(["dpkg", "-L", "slurm-client"]).stdout.split()
        self.path(SLURM_BIN).mkdir(parents=True)
        for f in out:
            if f.startswith("/usr/bin/") and self.path(f).is_file():
                shutil.move(str(self.path(f)), str(self.path(SLURM_BIN) / os.path.basename(f)))
        self.write("/etc/profile.d/slurm.sh", PROFILE_SLURM)
        # Name resolution as on any node (mmdebstrap writes no /etc/hosts); the host name stays the machine's.
        self.write("/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        # 2. What ParallelCluster leaves for its own scripts.
        self.write("/etc/parallelcluster/cfnconfig", f"cfn_node_type=ComputeFleet\ncfn_scheduler_queue_name={QUEUE}\n")
        self.write("/etc/parallelcluster/slurm_plugin/slurm_nodename", NODE_NAME + "\n")
        self.path("/opt/parallelcluster/shared").mkdir(parents=True)
        self.path("/fsx").mkdir()
        # 3. Test hooks: no systemd, Debian's AWS CLI without AWS_ENDPOINT_URL.
        self.write(f"{TEST_BIN}/systemctl", FAKE_SYSTEMCTL, 0o755)
        self.write(f"{TEST_BIN}/aws", FAKE_AWS, 0o755)
        self.chroot(["useradd", "-m", "-s", "/bin/bash", USER])

    def _mount(self) -> None:
        # The root a mount point of its own: CRIU walks the mount tree from a task's root ("No parent found for
        # mountpoint" otherwise).
        proc.run(["mount", "--bind", self.root, self.root])
        self.mounted.append(self.root)
        proc.run(["mount", "-t", "proc", "proc", str(self.path("/proc"))])
        self.mounted.append(str(self.path("/proc")))
        for d in ("/sys", "/dev"):  # with /sys/fs/cgroup, which slurmd initializes even with proctrack/linuxproc
            proc.run(["mount", "--rbind", d, str(self.path(d))])
            proc.run(["mount", "--make-rslave", str(self.path(d))])
            self.mounted.append(str(self.path(d)))
        for d in ("/run", "/tmp"):
            proc.run(["mount", "-t", "tmpfs", "-o", "mode=1777" if d == "/tmp" else "mode=0755", "tmpfs",
                      str(self.path(d))])
            self.mounted.append(str(self.path(d)))

    def seed_criu_cache(self, cache_name: str, binary: str) -> None:
        """A CRIU built ahead of time for this OS and architecture on the cluster's shared storage (what the head
        node's first boot leaves there), so the bootstrap installs it with its runtime libraries only."""
        dest = self.path(f"/opt/parallelcluster/shared/ckpt-agent/criu/{os.uname().machine}/{cache_name}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(binary, dest)
        dest.chmod(0o755)

    # -- running inside -------------------------------------------------------------------------------------------

    def chroot(self, argv: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 120,
               ok_codes=(0,)) -> proc.Result:
        base = ["chroot", self.root, "/usr/bin/env", "-i"]
        assignments = [f"{k}={v}" for k, v in (env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).items()]
        return proc.run(base + assignments + argv, timeout=timeout, ok_codes=ok_codes)

    def spawn(self, name: str, argv: List[str], env: Dict[str, str]) -> subprocess.Popen:
        log = open(self.path(f"/var/log/{name}.out"), "ab")
        child = subprocess.Popen(["chroot", self.root, "/usr/bin/env", "-i",
                                  *[f"{k}={v}" for k, v in env.items()], *argv],
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        log.close()
        self.procs[name] = child
        return child

    def log(self, name: str) -> str:
        p = self.path(f"/var/log/{name}.out")
        return p.read_text(errors="replace") if p.exists() else ""

    def slurm(self) -> Slurm:
        return Slurm(run=lambda argv, **kw: proc.run(["chroot", self.root, *argv], **kw), bin_dir=SLURM_BIN,
                     timeout=15)

    def start_slurm(self) -> None:
        ports = {"slurmctld": free_port(), "slurmd": free_port(), NODE_NAME: free_port()}
        w = "/var/lib/slurm-emu"
        settings = slurm_conf.settings(w, cluster_name="emunode", ports=ports,
                                       munge_socket="/run/munge/munge.socket.2", proctrack="linuxproc",
                                       first_job_id=100 + int.from_bytes(os.urandom(2), "big"))
        settings.pop("TaskProlog")
        for d in ("state", f"spool/{NODE_NAME}", "log"):
            self.path(f"{w}/{d}").mkdir(parents=True, exist_ok=True)
        self.write("/etc/slurm/slurm.conf", slurm_conf.render(w, settings, nodes=[NODE_NAME], ports=ports,
                                                              cpus_per_node=2, partition=QUEUE))
        self.path("/run/munge").mkdir(parents=True, exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self.spawn("munged", ["/usr/sbin/munged", "--foreground", "--force"], env)
        wait(lambda: self.path("/run/munge/munge.socket.2").exists(), 30, "munged", self)
        self.spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-c"], env)
        slurm = self.slurm()
        wait(slurm.ping, 60, "slurmctld", self)
        self.spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-N", NODE_NAME], env)
        wait(lambda: "IDLE" in slurm.node_state(NODE_NAME), 60, f"node {NODE_NAME} IDLE", self)

    # -- tearing down ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        try:
            self.chroot([f"{SLURM_BIN}/scancel", "-u", USER], timeout=20, ok_codes=(0, 1))
        except Exception:  # noqa: BLE001 - the controller may be gone already
            pass
        for name in reversed(list(self.procs)):
            child = self.procs[name]
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(timeout=10)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Job processes and slurmstepd that outlived slurmd: every process whose root is this root."""
        real = os.path.realpath(self.root)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{pid}/root") == real:
                    os.kill(int(pid), 9)
            except OSError:
                pass

    def remove(self) -> None:
        if self.keep:
            return
        for target in reversed(self.mounted):
            subprocess.run(["umount", "-R", "-l", target], capture_output=True)
        real = os.path.realpath(self.root)
        with open("/proc/self/mountinfo") as fh:
            left = [line.split()[4] for line in fh if line.split()[4].startswith(real + "/")]
        if left:  # never remove through a mount (/dev!): keep the root and say so
            raise RuntimeError(f"still mounted, root kept: {left}")
        shutil.rmtree(os.path.dirname(self.root), ignore_errors=True)


def wait(check, timeout: float, what: str, node: Optional[EmulatedNode] = None, poll: float = 0.2):
    """Wait for check() to be truthy (exceptions count as not yet); the timeout is a safety net."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(poll)
    logs = ""
    if node is not None:
        logs = "\n".join(f"--- {n}:\n{node.log(n)[-2000:]}" for n in node.procs)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})\n{logs}")
