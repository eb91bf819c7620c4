"""`control`: one JSON request and response per connection over a Unix socket, peer credentials from the
kernel, handler errors answered with their exit code, descriptors passed along, an unreachable peer named."""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading

import pytest

from ckpt_agent import PACKAGE_DIR
from ckpt_agent.adapters import control
from ckpt_agent.errors import EXIT_AGENT, AgentUnreachable, NotFoundError


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "c.sock")


@pytest.fixture
def serve(sock_path):
    servers = []

    def start(handler, mode=0o600):
        server = control.ControlServer(sock_path, handler, mode=mode).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


def test_request_and_response_with_peer_credentials(serve, sock_path):
    seen = {}

    def handler(req, creds, fds):
        seen.update(req=req, creds=creds, fds=fds)
        return {"ok": True, "generation": 3}

    serve(handler)
    assert control.request(sock_path, {"op": "checkpoint", "final": True}, timeout=5) == {"ok": True,
                                                                                           "generation": 3}
    assert seen["req"] == {"op": "checkpoint", "final": True}
    assert seen["creds"] == (os.getpid(), os.getuid(), os.getgid())
    assert seen["fds"] == []


def test_socket_is_created_with_the_requested_mode_and_removed_on_close(sock_path):
    server = control.ControlServer(sock_path, lambda r, c, f: {"ok": True}, mode=0o600).start()
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    server.close()
    assert not os.path.exists(sock_path)


def test_stale_socket_file_is_replaced(sock_path, serve):
    with open(sock_path, "w") as fh:
        fh.write("left over by a crashed wrapper")
    serve(lambda r, c, f: {"ok": True})
    assert control.request(sock_path, {}, timeout=5)["ok"] is True


def test_ckpt_error_in_handler_is_answered_with_its_exit_code(serve, sock_path):
    def handler(req, creds, fds):
        raise NotFoundError("no such job step")

    serve(handler)
    assert control.request(sock_path, {"op": "x"}, timeout=5) == {"ok": False, "error": "no such job step",
                                                                   "exit_code": 66}


def test_unexpected_error_in_handler_is_answered_as_internal(serve, sock_path):
    def handler(req, creds, fds):
        raise KeyError("boom")

    serve(handler)
    reply = control.request(sock_path, {}, timeout=5)
    assert reply["ok"] is False and reply["exit_code"] == 70
    assert "KeyError" in reply["error"]
    assert control.request(sock_path, {}, timeout=5)["exit_code"] == 70, "the server keeps serving"


def test_request_that_is_not_an_object_is_refused(serve, sock_path):
    serve(lambda r, c, f: {"ok": True})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"[1, 2]\n")
        reply = control._read_line(s)
    assert b'"ok": false' in reply and b"JSON object" in reply


def test_descriptors_travel_with_the_request(serve, sock_path):
    def handler(req, creds, fds):
        os.write(fds[0], b"written by the server")
        return {"ok": True, "count": len(fds)}

    serve(handler)
    r, w = os.pipe()
    try:
        reply = control.request(sock_path, {"op": "attach"}, timeout=5, fds=[w])
        os.close(w)
        assert reply == {"ok": True, "count": 1}
        assert os.read(r, 100) == b"written by the server"
        assert os.read(r, 100) == b"", "the server closed its copy of the descriptor"
    finally:
        os.close(r)


def test_large_request_arrives_whole(serve, sock_path):
    serve(lambda r, c, f: {"ok": True, "n": len(r["blob"])})
    assert control.request(sock_path, {"blob": "x" * 300_000}, timeout=5) == {"ok": True, "n": 300_000}


def test_missing_socket_is_agent_unreachable(tmp_path):
    with pytest.raises(AgentUnreachable) as exc:
        control.request(str(tmp_path / "nobody.sock"), {"op": "status"}, timeout=1)
    assert exc.value.exit_code == EXIT_AGENT == 79
    assert "nobody.sock" in str(exc.value)


def test_socket_without_listener_is_agent_unreachable(sock_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(sock_path)  # bound, never listening: what a wrapper killed mid-way can leave
        with pytest.raises(AgentUnreachable, match="cannot reach"):
            control.request(sock_path, {}, timeout=1)


def test_peer_that_closes_without_answer_is_agent_unreachable(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def close_at_once():
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=close_at_once)
    t.start()
    try:
        with pytest.raises(AgentUnreachable, match="without an answer"):
            control.request(sock_path, {"op": "status"}, timeout=5)
    finally:
        t.join(5)
        listener.close()


def test_slow_peer_times_out_as_agent_unreachable(serve, sock_path):
    release = threading.Event()

    def handler(req, creds, fds):
        release.wait(10)
        return {"ok": True}

    serve(handler)
    try:
        with pytest.raises(AgentUnreachable, match="no answer .* within 0.2 s"):
            control.request(sock_path, {}, timeout=0.2)
    finally:
        release.set()


def test_close_waits_for_requests_in_progress(sock_path):
    """On SIGTERM the agent closes its socket but lets a checkpoint it is doing for a job finish and answer."""
    started, release = threading.Event(), threading.Event()

    def handler(req, creds, fds):
        started.set()
        release.wait(30)
        return {"ok": True, "generation": 7}

    server = control.ControlServer(sock_path, handler).start()
    replies = []
    t = threading.Thread(target=lambda: replies.append(control.request(sock_path, {"op": "checkpoint"}, timeout=30)))
    t.start()
    assert started.wait(30)
    threading.Timer(0.2, release.set).start()
    assert server.close(wait=30) == 0
    t.join(30)
    assert replies == [{"ok": True, "generation": 7}]
    assert not os.path.exists(sock_path)


def test_close_gives_up_on_a_request_after_its_bound(sock_path):
    release = threading.Event()
    server = control.ControlServer(sock_path, lambda r, c, f: release.wait(60) and {"ok": True}).start()
    threading.Thread(target=lambda: control.request(sock_path, {}, timeout=60), daemon=True).start()
    try:
        wait_until_inflight = 30
        while not server._inflight and wait_until_inflight > 0:
            wait_until_inflight -= 0.05
            threading.Event().wait(0.05)
        assert server.close(wait=0.3) == 1
    finally:
        release.set()


@pytest.mark.parametrize("code, cls", [(2, "UsageError"), (65, "DamagedCheckpointError"), (66, "NotFoundError"),
                                       (69, "CriuError"), (74, "StoreError"), (76, "SlurmError"),
                                       (77, "PermissionDenied"), (78, "ConfigError"), (79, "AgentUnreachable"),
                                       (80, "AwsError"), (70, "CkptError"), (12, "CkptError")])
def test_remote_errors_are_raised_as_the_class_that_owns_their_code(code, cls):
    with pytest.raises(Exception) as exc:
        control.raise_for_reply({"ok": False, "error": "it failed", "exit_code": code}, "node agent: ")
    assert type(exc.value).__name__ == cls
    assert exc.value.exit_code == (code if cls != "CkptError" else 70)
    assert str(exc.value) == "node agent: it failed"
    assert control.raise_for_reply({"ok": True, "x": 1}) == {"ok": True, "x": 1}


def test_a_socket_of_another_user_is_a_refusal_naming_its_owner():
    import pwd
    import shutil
    import subprocess
    import tempfile

    d = tempfile.mkdtemp(dir="/tmp")  # every user may look up names here, as in the runtime directory
    os.chmod(d, 0o755)
    path = os.path.join(d, "job.sock")
    server = control.ControlServer(path, lambda r, c, f: {"ok": True}, mode=0o600).start()
    try:
        code = ("import sys\nfrom ckpt_agent.adapters import control\nfrom ckpt_agent.errors import PermissionDenied\n"
                "try:\n    control.request(sys.argv[1], {})\nexcept PermissionDenied as e:\n"
                "    print(e.exit_code, e)\n")
        nobody = pwd.getpwnam("nobody")
        res = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                              sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)})
        assert res.stdout.startswith("77 "), res.stdout + res.stderr
        assert "belongs to user root (uid 0)" in res.stdout
    finally:
        server.close()
        shutil.rmtree(d, ignore_errors=True)
