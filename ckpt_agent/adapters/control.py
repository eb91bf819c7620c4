"""JSON-lines request/response over a Unix stream socket: how `ckpt checkpoint` and the node agent talk to a
running `ckpt run` wrapper. One request and one response per connection; the handler runs in its own thread."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ckpt_agent.errors import (
    AgentUnreachable,
    CkptError,
    IncompatibleCpuError,
    PermissionDenied,
    error_for_exit_code,
)
from ckpt_agent.util.usercreds import owner_of_path

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20
MAX_FDS = 8
Handler = Callable[[Dict[str, Any], Tuple[int, int, int], List[int]], Dict[str, Any]]


def peer_credentials(conn: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED): cannot be forged."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def _read_request(conn: socket.socket) -> Tuple[bytes, List[int]]:
    """The request line and any descriptors sent with it (SCM_RIGHTS, e.g. a wrapper's stdio pipes)."""
    buf, fds, _, _ = socket.recv_fds(conn, 65536, MAX_FDS)
    if b"\n" not in buf and buf:
        buf += _read_line(conn)
    return buf.split(b"\n", 1)[0], list(fds)


def _read_line(conn: socket.socket, buf: bytes = b"") -> bytes:
    while b"\n" not in buf:
        part = conn.recv(65536)
        if not part:
            break
        buf += part
        if len(buf) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    return buf.split(b"\n", 1)[0]


class ControlServer:
    def __init__(self, path: str, handler: Handler, mode: int = 0o600):
        self.path = path
        self.handler = handler
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, mode)
        self.sock.listen(16)
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name=f"control:{os.path.basename(path)}", daemon=True)
        self._inflight: Set[threading.Thread] = set()
        self._inflight_lock = threading.Lock()

    def start(self) -> ControlServer:
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            with self._inflight_lock:  # started under the lock: a request close() can see is one that runs
                self._inflight.add(t)
                try:
                    t.start()
                except RuntimeError:  # no thread to be had: the request is dropped, the client sees EOF
                    self._inflight.discard(t)
                    conn.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        finally:
            with self._inflight_lock:
                self._inflight.discard(threading.current_thread())

    def _answer(self, conn: socket.socket) -> None:
        fds: List[int] = []
        with conn:
            try:
                creds = peer_credentials(conn)
                line, fds = _read_request(conn)
                request = json.loads(line or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                response = self.handler(request, creds, fds)
            except CkptError as e:
                response = {"ok": False, "error": str(e), "exit_code": e.exit_code}
                if getattr(e, "kind", ""):
                    response["kind"] = e.kind
            except Exception as e:  # keep serving; report the failure to the caller
                log.exception("control request failed")
                response = {"ok": False, "error": f"{type(e).__name__}: {e}", "exit_code": 70}
            finally:
                for fd in fds:  # handlers dup what they keep
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            try:
                conn.sendall(json.dumps(response).encode() + b"\n")
            except OSError:
                pass

    def close(self, wait: float = 0.0) -> int:
        """Stop accepting requests; then wait up to `wait` seconds for the requests in progress (a checkpoint or
        restore the agent is doing for a job) to finish and answer. Returns how many were still running."""
        self._closed = True
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while True:
            with self._inflight_lock:
                running = [t for t in self._inflight if t.is_alive()]
            left = deadline - time.monotonic()
            if not running or left <= 0:
                return len(running)
            running[0].join(min(left, 0.5))


def request(
    path: str, payload: Dict[str, Any], timeout: Optional[float] = None, fds: Sequence[int] = ()
) -> Dict[str, Any]:
    """Send one request (with descriptors, if any) and wait for its response (timeout None: as long as it takes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except PermissionError as e:
            raise PermissionDenied(f"{path} belongs to {owner_of_path(path)}: only that user or root may use it") \
                from e
        except OSError as e:
            raise AgentUnreachable(f"cannot reach {path}: {e.strerror or e}") from e
        data = json.dumps(payload).encode() + b"\n"
        if fds:
            sent = socket.send_fds(sock, [data], list(fds))
            if sent < len(data):  # sendall(b"") to a peer that already answered and closed raises EPIPE
                sock.sendall(data[sent:])
        else:
            sock.sendall(data)
        line = _read_line(sock)
    except socket.timeout as e:
        raise AgentUnreachable(f"no answer from {path} within {timeout:g} s") from e
    finally:
        sock.close()
    if not line:
        raise AgentUnreachable(f"{path} closed the connection without an answer")
    return json.loads(line)


def raise_for_reply(reply: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """The reply when it says ok; else the remote error, raised as the subclass that owns its exit code."""
    if reply.get("ok"):
        return reply
    message = prefix + str(reply.get("error", "request failed"))
    if reply.get("kind") == IncompatibleCpuError.kind:  # a kind of its own within its exit code (69)
        raise IncompatibleCpuError(message)
    raise error_for_exit_code(int(reply.get("exit_code", 70)), message)

