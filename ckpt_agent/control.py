"""JSON-lines request/response over a Unix stream socket: how `ckpt checkpoint` and the node agent talk to a
running `ckpt run` wrapper. One request and one response per connection; the handler runs in its own thread."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import AgentUnreachable, CkptError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20
Handler = Callable[[Dict[str, Any], Tuple[int, int, int]], Dict[str, Any]]


def peer_credentials(conn: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED): cannot be forged."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
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

    def start(self) -> "ControlServer":
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                creds = peer_credentials(conn)
                request = json.loads(_read_line(conn) or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                response = self.handler(request, creds)
            except CkptError as e:
                response = {"ok": False, "error": str(e), "exit_code": e.exit_code}
            except Exception as e:  # keep serving; report the failure to the caller
                log.exception("control request failed")
                response = {"ok": False, "error": f"{type(e).__name__}: {e}", "exit_code": 70}
            try:
                conn.sendall(json.dumps(response).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def request(path: str, payload: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
    """Send one request and wait for its response (timeout None: as long as the checkpoint takes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise AgentUnreachable(f"cannot reach {path}: {e.strerror or e}") from e
        sock.sendall(json.dumps(payload).encode() + b"\n")
        line = _read_line(sock)
    except socket.timeout as e:
        raise AgentUnreachable(f"no answer from {path} within {timeout:g} s") from e
    finally:
        sock.close()
    if not line:
        raise AgentUnreachable(f"{path} closed the connection without an answer")
    return json.loads(line)
