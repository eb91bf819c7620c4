"""bootstrap/on-node-configured.sh, run for real on this machine against a local bundle under a temporary root.

Fakes stand in only for what would change this machine or needs AWS: systemctl (records calls and keeps state in
files), the package manager, install-criu.sh (the real one is tested by the CRIU work) and, for one run, the aws CLI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_helpers import REPO

from ckpt_agent.node.config import load_agent_config
from ckpt_agent.site.render import render_site, write_tree
from ckpt_agent.site.schema import load_site
from ckpt_agent.site.upload import build_bundle

SCRIPT = REPO / "bootstrap" / "on-node-configured.sh"
EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
SHARED = "opt/parallelcluster/shared/ckpt-agent"
PATCHES = sorted((REPO / "bootstrap/patches/criu-4.2.1").glob("*.patch"))
# install-criu.sh's cache name: criu-<version>-<first 16 hex of sha256 over the patches, in order>
CRIU_CACHE_NAME = "criu-4.2.1-" + hashlib.sha256(b"".join(p.read_bytes() for p in PATCHES)).hexdigest()[:16]

FAKES = {
    "systemctl": r"""#!/bin/bash
# Records every call; keeps enabled/active state as files.
echo "systemctl $*" >>"$FAKE_LOG"
state="$FAKE_STATE"; mkdir -p "$state"
args=(); for a in "$@"; do case "$a" in --*) ;; *) args+=("$a") ;; esac; done
case "${args[0]}" in
  is-enabled) [ -e "$state/${args[1]}.enabled" ] ;;
  is-active) [ -e "$state/${args[1]}.active" ] ;;
  enable) touch "$state/${args[1]}.enabled" ;;
  start|restart) touch "$state/${args[1]}.active" ;;
  daemon-reload) ;;
  *) exit 1 ;;
esac
""",
    "pkg-install": r"""#!/bin/bash
echo "pkg-install $*" >>"$FAKE_LOG"
for p in "$@"; do
  if [ "$p" = cronie ]; then printf '#!/bin/sh\n' >"$FAKE_BIN/crond"; chmod +x "$FAKE_BIN/crond"; fi
done
""",
    "install-criu": r"""#!/bin/bash
# Stands in for install-criu.sh: checks what it is given, installs a criu that passes `criu check`, fills the cache.
set -euo pipefail
echo "install-criu cache=$CRIU_CACHE_DIR prefix=$CRIU_PREFIX source_exists=$([ -f "$CRIU_SOURCE_URL" ] && echo yes)" \
  "patches=$(ls "$CRIU_PATCH_DIR" | tr '\n' ' ')" >>"$FAKE_LOG"
echo "install-criu: this goes to stderr, as the real one logs"  >&2
# The real script's cache name: criu-<version>-<patch set id>.
name="criu-$CRIU_VERSION-$(cat "$CRIU_PATCH_DIR"/*.patch | sha256sum | cut -c1-16)"
if [ ! -x "$CRIU_PREFIX/sbin/criu" ]; then
  mkdir -p "$CRIU_PREFIX/sbin"
  if [ -x "$CRIU_CACHE_DIR/$name" ]; then
    cp "$CRIU_CACHE_DIR/$name" "$CRIU_PREFIX/sbin/criu"
  else
    printf '#!/bin/sh\n[ "$1" = check ] && echo "Looks good."\n' >"$CRIU_PREFIX/sbin/criu"
    chmod +x "$CRIU_PREFIX/sbin/criu"
    cp "$CRIU_PREFIX/sbin/criu" "$CRIU_CACHE_DIR/$name"
  fi
fi
""",
    "criu-broken": "#!/bin/sh\n"
                   "echo 'Error (criu/cr-check.c:1234): Kernel lacks ptrace PTRACE_O_SUSPEND_SECCOMP'\nexit 1\n",
    "aws": r"""#!/bin/bash
# aws s3 cp s3://BUCKET/KEY DEST, answered from $FAKE_S3/BUCKET/KEY.
echo "aws $*" >>"$FAKE_LOG"
[ "$1 $2" = "s3 cp" ] || exit 2
src="${@: -2:1}"; dest="${@: -1}"
if [ "$3" = --recursive ]; then cp -R "$FAKE_S3/${src#s3://}." "$dest"; else cp "$FAKE_S3/${src#s3://}" "$dest"; fi
""",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The real bundle `ckpt upload` would send, built from the example site."""
    base = tmp_path_factory.mktemp("bundle")
    (base / "site.yaml").write_text(this_platform_only(EXAMPLE.read_text()))
    (base / "criu_4.2.1.orig.tar.xz").write_bytes(b"criu source stand-in")
    site = load_site(str(base / "site.yaml"))
    write_tree(str(base / "rendered"), render_site(site, "site.yaml"))
    build_bundle(site, str(base / "site.yaml"), str(base / "rendered"), str(base / "bundle"))
    return base / "bundle"


def this_platform_only(site_text: str) -> str:
    """The site with a wheelhouse for this machine's Python and architecture only: a real `pip download`, small."""
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return site_text.replace("  prefix: ckpt-agent/eda-spot\n", f"  prefix: ckpt-agent/eda-spot\n"
                             f"  pythons: ['{py}']\n  architectures: [{os.uname().machine}]\n")


class Node:
    """One machine: a root prefix, fakes on PATH, a log of what the fakes were asked to do."""

    def __init__(self, base: Path, shared_with: Node | None = None) -> None:
        self.root = base / "root"
        self.bin = base / "bin"
        self.log = base / "calls.log"
        self.bin.mkdir(parents=True)
        self.root.mkdir()
        self.log.write_text("")
        for name, text in FAKES.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)
        if shared_with is not None:  # the head node's /opt/parallelcluster/shared, as NFS gives it to compute nodes
            (self.root / "opt/parallelcluster").mkdir(parents=True)
            (shared_with.root / "opt/parallelcluster/shared").mkdir(parents=True, exist_ok=True)
            os.symlink(shared_with.root / "opt/parallelcluster/shared", self.root / "opt/parallelcluster/shared")

    def run(self, *args: str, check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "CKPT_ROOT": str(self.root),
            "CKPT_SYSTEMCTL": str(self.bin / "systemctl"),
            "CKPT_PKG_INSTALL": f"bash {self.bin / 'pkg-install'}",
            "CKPT_INSTALL_CRIU": f"bash {self.bin / 'install-criu'}",
            "CKPT_AWS": str(self.bin / "aws"),
            "CKPT_PYTHON": sys.executable,
            "CKPT_PIP_OPTS": "",
            "CKPT_RETRIES": "1",
            "FAKE_LOG": str(self.log),
            "FAKE_STATE": str(self.bin.parent / "systemd-state"),
            "FAKE_BIN": str(self.bin),
            **env_extra,
        }
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def calls(self) -> list:
        return self.log.read_text().splitlines()

    def snapshot(self) -> dict:
        """Every file and link under the root: content, mode and mtime; directories by name and mode."""
        out = {}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if rel == "var/log/ckpt-bootstrap.log":  # every run appends its progress
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, path.read_bytes())
        return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _preinstalled_agent(node: Node, bundle: Path, extras: str = "") -> None:
    """Make the node look like the agent from `bundle` is installed already (spares creating a venv)."""
    venv = node.root / "opt/ckpt-agent/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/ckpt").write_text("#!/bin/sh\n")
    (venv / "bin/ckpt").chmod(0o755)
    wheel = next((bundle / "wheels").glob("ckpt_agent-*.whl"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (venv / ".ckpt-wheel.sha256").write_text(hashlib.sha256(f"{digest}\n{extras}\n".encode()).hexdigest() + "\n")
    (venv / "bin/python").symlink_to(sys.executable)


@pytest.fixture(scope="module")
def head(tmp_path_factory, bundle):
    node = Node(tmp_path_factory.mktemp("head"))
    node.first = node.run("head", str(bundle))
    return node


def test_head_node_first_run(head, bundle):
    root = head.root
    key = root / "etc/ckpt-agent/node.key"
    assert mode(key) == 0o600 and len(key.read_text()) == 64 and int(key.read_text(), 16) >= 0
    shared_key = root / SHARED / "secret/node.key"
    assert shared_key.read_bytes() == key.read_bytes() and mode(shared_key) == 0o600
    assert mode(root / SHARED / "secret") == 0o700
    assert mode(root / "etc/ckpt-agent") == 0o755, "users' ckpt run reads agent.yaml here (issue 10)"
    assert (root / "etc/ckpt-agent/agent.yaml").read_bytes() == (bundle / "head/agent.yaml").read_bytes()
    assert load_agent_config(str(root / "etc/ckpt-agent/agent.yaml")).store == "/fsx/ckpt"
    for unit in ("ckpt-gc.service", "ckpt-gc.timer"):
        installed = root / "etc/systemd/system" / unit
        assert installed.read_bytes() == (bundle / "head" / unit).read_bytes() and mode(installed) == 0o644
    assert not (root / "etc/cron.d/ckpt-gc").exists()
    assert "systemctl enable ckpt-gc.timer" in head.calls() and "systemctl start ckpt-gc.timer" in head.calls()
    assert not [c for c in head.calls() if c.startswith("pkg-install")], "the head node installed packages"
    assert (root / "fsx/ckpt").is_dir()
    plugin = root / "opt/slurm/etc/job_submit.lua"  # transparent mode (also installed at OnNodeStart)
    assert plugin.read_bytes() == (bundle / "head/job_submit.lua").read_bytes() and mode(plugin) == 0o644
    venv = root / "opt/ckpt-agent/venv"
    assert (venv / "bin/ckpt").is_file()
    assert list((venv / "lib").glob("python3*/site-packages/ckpt_agent/site/schema.py"))
    arch = os.uname().machine
    assert f"install-criu cache={root}/{SHARED}/criu/{arch} prefix={root}/usr/local source_exists=yes " in "\n".join(
        head.calls())
    assert (root / SHARED / f"criu/{arch}/{CRIU_CACHE_NAME}").is_file()
    assert f"patches={PATCHES[0].name} " in " ".join(head.calls()), "the bundle's CRIU patches were not passed"
    # ckpt on users' PATH: a profile.d entry and a link in /usr/local/bin
    assert os.readlink(root / "usr/local/bin/ckpt") == "/opt/ckpt-agent/venv/bin/ckpt"
    assert os.readlink(root / "opt/ckpt-agent/bin/ckpt") == "/opt/ckpt-agent/venv/bin/ckpt"
    assert (root / "etc/profile.d/ckpt-agent.sh").read_bytes() == (bundle / "profile.d/ckpt-agent.sh").read_bytes()
    # boto3 for the head node's AWS commands, from the wheelhouse
    assert list((venv / "lib").glob("python3*/site-packages/boto3/__init__.py"))
    # progress on stdout and in the log file, with install-criu's own lines; nothing on stderr
    log = (root / "var/log/ckpt-bootstrap.log").read_text()
    assert "done: role head" in log and "install-criu: this goes to stderr" in log
    assert head.first.stderr == ""
    assert not list((root / "var/lib/ckpt-agent").iterdir()), "the staged bundle was not cleaned up"
    assert "done: role head" in head.first.stdout


def test_head_node_second_run_changes_nothing(head, bundle):
    before, calls_before = head.snapshot(), head.calls()
    head.run("head", str(bundle))
    assert head.snapshot() == before
    new = head.calls()[len(calls_before):]
    assert not [c for c in new if c.startswith(("pkg-install", "systemctl enable", "systemctl start",
                                                "systemctl restart"))], new


@pytest.fixture(scope="module")
def compute(tmp_path_factory, bundle, head):
    node = Node(tmp_path_factory.mktemp("compute"), shared_with=head)
    _preinstalled_agent(node, bundle)  # the head node's run covers creating the venv and installing the wheel
    s3 = tmp_path_factory.mktemp("s3")
    shutil.copytree(bundle, s3 / "bucket" / "prefix")
    node.s3 = s3
    node.first = node.run("compute", "sim-spot", "s3://bucket/prefix", FAKE_S3=str(s3))
    return node


def test_compute_node_first_run(compute, head, bundle):
    root = compute.root
    assert (root / "etc/ckpt-agent/node.key").read_bytes() == (head.root / "etc/ckpt-agent/node.key").read_bytes()
    assert mode(root / "etc/ckpt-agent/node.key") == 0o600
    assert mode(root / "etc/ckpt-agent") == 0o755, "users' ckpt run reads agent.yaml here (issue 10)"
    assert (root / "etc/ckpt-agent/agent.yaml").read_bytes() == (bundle / "nodes/sim-spot/agent.yaml").read_bytes()
    assert load_agent_config(str(root / "etc/ckpt-agent/agent.yaml")).queue == "sim-spot"
    unit = root / "etc/systemd/system/ckpt-agent.service"
    assert unit.read_bytes() == (bundle / "systemd/ckpt-agent.service").read_bytes()
    calls = compute.calls()
    assert any(c.startswith("aws s3 cp --recursive --only-show-errors s3://bucket/prefix/ ") for c in calls), calls
    # CRIU came from the head node's build on shared storage.
    arch = os.uname().machine
    assert (root / "usr/local/sbin/criu").read_bytes() == (head.root / SHARED / f"criu/{arch}/{CRIU_CACHE_NAME}"
                                                             ).read_bytes()
    assert "CRIU preflight passed" in compute.first.stdout
    state_changes = [c for c in calls if c.startswith("systemctl") and "is-" not in c]
    assert state_changes == ["systemctl daemon-reload", "systemctl enable ckpt-agent", "systemctl start ckpt-agent"]
    assert not [c for c in calls if c.startswith("pkg-install")]


def test_compute_node_second_run_changes_nothing(compute):
    before, calls_before = compute.snapshot(), compute.calls()
    compute.run("compute", "sim-spot", "s3://bucket/prefix", FAKE_S3=str(compute.s3))
    assert compute.snapshot() == before
    new = compute.calls()[len(calls_before):]
    assert not [c for c in new if c.startswith("systemctl") and "is-" not in c], new


def test_compute_node_restarts_the_agent_when_its_config_changes(compute, bundle, tmp_path):
    changed = tmp_path / "bundle"
    shutil.copytree(bundle, changed)
    agent = changed / "nodes/sim-spot/agent.yaml"
    agent.write_text(agent.read_text().replace("keep: 2", "keep: 4"))
    subprocess.run("sha256sum $(cut -d' ' -f3 SHA256SUMS) > SHA256SUMS.new && mv SHA256SUMS.new SHA256SUMS",
                   shell=True, cwd=changed, check=True)
    calls_before = compute.calls()
    compute.run("compute", "sim-spot", str(changed))
    assert "keep: 4" in (compute.root / "etc/ckpt-agent/agent.yaml").read_text()
    new = compute.calls()[len(calls_before):]
    assert [c for c in new if c.startswith("systemctl") and "is-" not in c] == ["systemctl restart ckpt-agent"]


def test_queue_without_checkpointing_gets_no_criu_and_no_service(tmp_path, bundle, head):
    node = Node(tmp_path, shared_with=head)
    _preinstalled_agent(node, bundle)
    proc = node.run("compute", "ondemand", str(bundle))
    assert (node.root / "etc/ckpt-agent/agent.yaml").read_bytes() == (bundle / "nodes/ondemand/agent.yaml").read_bytes()
    assert not (node.root / "etc/systemd/system/ckpt-agent.service").exists()
    assert not [c for c in node.calls() if c.startswith(("install-criu", "systemctl"))]
    assert "checkpointing is off for queue ondemand" in proc.stdout


def test_criu_preflight_failure_fails_the_node_clearly(tmp_path, bundle, head):
    node = Node(tmp_path, shared_with=head)
    proc = node.run("compute", "sim-spot", str(bundle), check=False, CKPT_CRIU=str(node.bin / "criu-broken"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("on-node-configured: ERROR: CRIU cannot checkpoint on this node (kernel ")
    assert "PTRACE_O_SUSPEND_SECCOMP" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (node.root / "opt/ckpt-agent/venv").exists()


def test_compute_without_the_head_nodes_key_fails(tmp_path, bundle):
    lonely = Node(tmp_path / "h")
    node = Node(tmp_path / "c", shared_with=lonely)
    proc = node.run("compute", "sim-spot", str(bundle), check=False)
    assert proc.returncode == 1
    assert "the cluster's signing key is missing" in proc.stderr


def test_tampered_bundle_is_refused(tmp_path, bundle):
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    (bad / "nodes/sim-spot/agent.yaml").write_text("store: /elsewhere\n")
    node = Node(tmp_path / "n")
    proc = node.run("head", str(bad), check=False)
    assert proc.returncode == 1 and "fails its SHA256SUMS" in proc.stderr
    assert not (node.root / "etc/ckpt-agent").exists()


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        ((), 2, "usage: on-node-configured.sh head BUNDLE"),
        (("compute", "sim-spot"), 2, "usage:"),
        (("worker", "x"), 2, "usage:"),
        (("compute", "no-such-queue", "BUNDLE"), 1, "no nodes/no-such-queue/node.env in the bundle"),
        (("compute", "Bad;Queue", "BUNDLE"), 1, "bad queue name"),
    ],
    ids=["no-args", "missing-bundle", "bad-role", "unknown-queue", "bad-queue-name"],
)
def test_bad_arguments(tmp_path, bundle, args, code, fragment):
    node = Node(tmp_path)
    args = tuple(str(bundle) if a == "BUNDLE" else a for a in args)
    proc = node.run(*args, check=False)
    assert proc.returncode == code
    assert fragment in proc.stderr


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed")
    subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def test_criu_source_from_s3(tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    text = EXAMPLE.read_text().replace("source: ./criu_4.2.1.orig.tar.xz", "source: s3://tools-mirror/criu/c.tar.xz")
    (base / "site.yaml").write_text(this_platform_only(text))
    site = load_site(str(base / "site.yaml"))
    write_tree(str(base / "rendered"), render_site(site, "site.yaml"))
    build_bundle(site, str(base / "site.yaml"), str(base / "rendered"), str(base / "bundle"))
    s3 = tmp_path / "s3"
    (s3 / "tools-mirror/criu").mkdir(parents=True)
    (s3 / "tools-mirror/criu/c.tar.xz").write_bytes(b"tarball")
    node = Node(tmp_path / "n")
    _preinstalled_agent(node, base / "bundle", "[aws]")
    node.run("head", str(base / "bundle"), FAKE_S3=str(s3))
    calls = node.calls()
    assert any(c.startswith("aws s3 cp --only-show-errors s3://tools-mirror/criu/c.tar.xz ") for c in calls), calls
    assert " source_exists=yes " in [c for c in calls if c.startswith("install-criu")][0]


def test_head_node_without_systemd_falls_back_to_cron(tmp_path, bundle):
    """Only where no timer can run (no systemd) does the cleanup go to cron, installing a cron daemon if needed."""
    node = Node(tmp_path)
    _preinstalled_agent(node, bundle, "[aws]")
    proc = node.run("head", str(bundle), CKPT_SYSTEMCTL="")
    cron = node.root / "etc/cron.d/ckpt-gc"
    assert cron.read_bytes() == (bundle / "head/ckpt-gc.cron").read_bytes() and mode(cron) == 0o644
    assert "PATH=/opt/slurm/bin:" in cron.read_text()
    assert not (node.root / "etc/systemd/system/ckpt-gc.timer").exists()
    assert "pkg-install cronie" in node.calls()
    assert "the cleanup runs from cron instead of ckpt-gc.timer" in proc.stdout
