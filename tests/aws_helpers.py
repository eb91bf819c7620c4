"""Endpoints for the observability tests: a moto server on a free loopback port, and an endpoint that accepts
connections and never answers (a blocked or black-holed AWS endpoint)."""

from __future__ import annotations

import socket
import threading
from typing import List

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}


class MotoEndpoint:
    def __enter__(self) -> str:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.stop()


class HangingEndpoint:
    """Accepts every connection, reads nothing, answers nothing, until closed. `accepted` is set at the first one."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: List[socket.socket] = []
        self.accepted = threading.Event()
        self._closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def __enter__(self) -> HangingEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed = True
        self.sock.close()
        for c in self.conns:
            c.close()
