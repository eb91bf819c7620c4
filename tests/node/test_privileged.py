"""ckpt_agent.node.privileged: the root agent's service for ordinary users' wrappers, at its boundary, with a fake owner
lookup and a fake engine (the real path is in test_slurm_e2e.py and test_two_users.py). Every request a user can
forge is refused with its documented code before the engine is asked anything."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time

import pytest
from ckpt_helpers import wait_for

from ckpt_agent.checkpoint import launcher
from ckpt_agent.checkpoint.engine import CheckpointResult, RestoreResult
from ckpt_agent.errors import EXIT_PERMISSION, EXIT_USAGE, CkptError, PermissionDenied, UsageError
from ckpt_agent.node.privileged import PrivilegedService
from ckpt_agent.store.manifest import FORMAT_VERSION, Manifest
from ckpt_agent.util.usercreds import Creds

NOBODY = pwd.getpwnam("nobody")


class FakeEngine:
    def __init__(self):
        self.calls = []
        self.warmed = 0

    def warm_up(self):  # the real one measures the codecs and the store's bandwidth in the background (test_chunks)
        self.warmed += 1

    def checkpoint(self, job, *, final, reason, timeout=None):
        self.calls.append(("checkpoint", job, final))
        return CheckpointResult(generation=4, final=final, reason=reason, bytes_in=1, bytes_written=1, bytes_new=1,
                                frozen_seconds=0.1, total_seconds=0.2, created="2026-12-02T00:00:00Z")

    def sweep_staging(self):  # the real one removes dead checkpointers' staging images (test_runner_hardening)
        return []

    def restore(self, job_id, step, pipes, *, require_signature, creds, check_manifest, cgroup_pid):
        self.calls.append(("restore", job_id, step, require_signature, creds))
        check_manifest(self.manifest)
        return RestoreResult(pid=1234, generation=3, created="2026-12-02T00:00:00Z", skipped=[], seconds=0.1,
                             files_written=0)


def service(owner=NOBODY.pw_uid):
    engine = FakeEngine()
    return PrivilegedService(engine, owner_of=lambda job: owner, node="node1"), engine


def creds_of_me():
    return (os.getpid(), NOBODY.pw_uid, NOBODY.pw_gid)


@pytest.mark.parametrize("job_id, step", [("../../etc", "main"), ("42", "../x"), ("42", "/abs"), ("", "main"),
                                          ("4" * 300, "main"), ("42", "a\nb"), ("42", ".")])
def test_forged_names_are_refused_before_anything_else(job_id, step):
    svc, engine = service()
    with pytest.raises(CkptError) as exc:
        svc.handle({"op": "checkpoint", "job_id": job_id, "step": step, "init_pid": 1}, creds_of_me(), [])
    assert exc.value.exit_code in (EXIT_USAGE, 74)
    assert engine.calls == []


@pytest.mark.parametrize("op", ["checkpoint", "restore", "launch"])
def test_a_job_of_another_user_is_refused(op):
    svc, engine = service(owner=12345)
    with pytest.raises(PermissionDenied) as exc:
        svc.handle({"op": op, "job_id": "42", "step": "main", "init_pid": 1}, creds_of_me(), [])
    assert exc.value.exit_code == EXIT_PERMISSION
    assert "belongs to uid 12345" in str(exc.value)
    assert engine.calls == []


def test_unknown_requests_and_wrong_pipe_counts_are_usage_errors():
    svc, engine = service()
    with pytest.raises(UsageError, match="unknown request"):
        svc.handle({"op": "format-disk", "job_id": "42", "step": "main"}, creds_of_me(), [])
    for fds in ([], [0], [0, 1, 2, 3]):
        with pytest.raises(UsageError, match="expected 3 pipe descriptors"):
            svc.handle({"op": "restore", "job_id": "42", "step": "main"}, creds_of_me(), list(fds))
    with pytest.raises(UsageError, match="argv"):
        svc.handle({"op": "launch", "job_id": "42", "step": "main", "argv": "rm -rf /", "cwd": "/", "env": {}},
                   creds_of_me(), [0, 1, 2])
    assert engine.calls == []


@pytest.mark.parametrize("manifest_uid, ok", [(NOBODY.pw_uid, True), (0, False), (12345, False), (None, False)])
def test_restore_requires_a_signed_checkpoint_of_the_requester(manifest_uid, ok):
    svc, engine = service()
    engine.manifest = Manifest(format=FORMAT_VERSION, created="", images=[], files=[], uid=manifest_uid)
    req = {"op": "restore", "job_id": "42", "step": "main"}
    r, w = os.pipe()
    try:
        if ok:
            reply = svc.handle(req, creds_of_me(), [w, w, w])
            assert reply["ok"] and reply["generation"] == 3
        else:
            with pytest.raises(PermissionDenied, match="belongs to uid"):
                svc.handle(req, creds_of_me(), [w, w, w])
    finally:
        os.close(r)
        os.close(w)
    assert engine.calls[0][:4] == ("restore", "42", "main", True), "only signed checkpoints are restored"
    # a job restored on this node: what its first checkpoint would measure is measured now (a refused one: nothing)
    assert engine.warmed == (1 if ok else 0)


def test_checkpoint_only_of_our_namespace_init_running_the_requesters_job(monkeypatch):
    """A real namespace init launched for 'nobody' may be checkpointed by nobody; not by another uid, and no
    other process (the requester's own shell, a root process, a pid that is not running) may be."""
    # nsinit is standard library only and runs as the user: an interpreter every user can read, as on a node
    # (this test's own may live under root's home)
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    svc, engine = service()
    r, w = os.pipe()
    user = Creds(NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,))
    init_pid = launcher.launch(["sleep", "600"], "/", {"PATH": "/usr/bin:/bin"}, w, w, w, creds=user)
    plain = subprocess.Popen(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
                              "sleep", "600"])
    try:
        wait_for(lambda: _cmdline(init_pid).count(b"--") >= 1, 30, "the namespace init to exec")
        wait_for(lambda: _cmdline(plain.pid).startswith(b"sleep"), 30, "setpriv to become nobody and exec")
        req = {"op": "checkpoint", "job_id": "42", "step": "main", "init_pid": init_pid, "cwd": "/",
               "argv": ["sleep", "600"]}
        requester = (plain.pid, NOBODY.pw_uid, NOBODY.pw_gid)  # a process of nobody's asks, as a wrapper would
        assert svc.handle(req, requester, [])["generation"] == 4
        job = engine.calls[-1][1]
        assert (job.uid, job.gid, job.init_pid) == (NOBODY.pw_uid, NOBODY.pw_gid, init_pid)
        other = PrivilegedService(engine, owner_of=lambda job: 12346, node="node1")
        with pytest.raises(PermissionDenied, match=f"runs a job of uid {NOBODY.pw_uid}, not of uid 12346"):
            other.handle(req, (os.getpid(), 12346, 12346), [])
        for pid in (plain.pid, os.getpid(), 1):
            with pytest.raises(PermissionDenied, match="not the init of a job|not a running job"):
                svc.handle({**req, "init_pid": pid}, creds_of_me(), [])
        with pytest.raises(PermissionDenied, match="not a running job"):
            svc.handle({**req, "init_pid": 2 ** 22 + 17}, creds_of_me(), [])
    finally:
        plain.kill()
        plain.wait()
        os.kill(init_pid, 9)
        _reap(init_pid)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("cmdline, expected", [
    ([sys.executable.encode(), b"-I", b"-S", b"/x/ckpt_agent/nsinit.py", b"5", b"--", b"tool", b""], (True, None)),
    ([b"py", b"-I", b"-S", b"/x/nsinit.py", b"5", b"--as", b"1001:1001:1001", b"--", b"tool"], (True, 1001)),
    ([b"py", b"-I", b"-S", b"/x/nsinit.py", b"5", b"--as", b"junk", b"--", b"tool"], (False, None)),
    ([b"py", b"/x/nsinit.py", b"5", b"--", b"tool", b""], (False, None)),
    ([b"py", b"-I", b"-S", b"/x/evil.py", b"5", b"--", b"nsinit.py"], (False, None)),
    ([b"py", b"-I", b"-S", b"/x/nsinit.py", b"x", b"--", b"tool"], (False, None)),
])
def test_our_namespace_init_is_recognised_by_the_command_line_the_launcher_writes(cmdline, expected):
    assert launcher.nsinit_runs_as(cmdline) == expected
    built = launcher.nsinit_command(5, ["--as", "1001:1001:1001"], ["tool", "arg"])
    assert launcher.nsinit_runs_as([a.encode() for a in built]) == (True, 1001)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _reap(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
