"""A local EC2 instance metadata service (IMDSv2) for tests and the demo, speaking the real protocol on loopback.

What it implements, as AWS documents IMDSv2 with `HttpTokens: required`:
- `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..21600` returns a token; a missing or
  invalid TTL answers 400, a request carrying `X-Forwarded-For` answers 403 (IMDS refuses proxied token requests);
- every GET needs a live token in `X-aws-ec2-metadata-token`, else 401 (missing, unknown or expired);
- `/latest/meta-data/spot/instance-action` answers 404 until a notice is injected, then
  `{"action": ..., "time": "YYYY-MM-DDTHH:MM:SSZ"}`; `spot/termination-time` likewise for "terminate";
- `/latest/meta-data/events/recommendations/rebalance` answers 404 or `{"noticeTime": ...}`;
- `instance-id`, `instance-type`, `placement/availability-zone`, `placement/region` and
  `/latest/dynamic/instance-identity/document`.

Test hooks: notices injected and cleared at runtime, the next N requests answering 5xx or delayed by S seconds,
tokens expired on demand, and request counts per (method, path) so a test can assert that a token is reused.

As a process (one per simulated node in the demo):

    python -m ckpt_dev.imds_server --port 0 --port-file /tmp/imds1.port \\
        --instance-id i-0aaa --instance-type c6i.large --availability-zone us-east-1a

It prints `listening on http://127.0.0.1:PORT` and serves until SIGTERM or SIGINT. The control endpoints, on the
same server and without a token (loopback only; they are neither counted nor subject to injected faults):

    POST /_control/spot-notice?action=terminate&seconds=120   inject an interruption notice (action, seconds from now)
    POST /_control/rebalance                                   inject a rebalance recommendation (noticeTime = now)
    POST /_control/clear                                       remove notice, recommendation and pending faults
    POST /_control/fail?count=N&status=500                     the next N metadata requests answer `status`
    POST /_control/delay?count=N&seconds=S                     the next N metadata requests wait S s before answering
    POST /_control/expire-tokens                               every issued token expires now (next GET gets 401)
    GET  /_control/counts                                      {"GET /latest/meta-data/...": n, ...} as JSON

e.g. `curl -X POST 'http://127.0.0.1:PORT/_control/spot-notice?seconds=120'`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL_SECONDS = 21600  # the range AWS accepts: 1 s to 6 h
CONTROL_PREFIX = "/_control/"
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
SHUTDOWN_POLL_SECONDS = 0.05  # how fast stop() returns; http.server's default 0.5 s adds up over a test suite


def _imds_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ImdsServer:
    """The server as an object: `with ImdsServer(instance_id="i-1") as imds: ImdsClient(imds.url) ...`.

    `clock` (monotonic seconds, for token expiry) and `now` (aware UTC datetime, for notice times) are injectable.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        instance_id: str = "i-0123456789abcdef0",
        instance_type: str = "c6i.large",
        availability_zone: str = "us-east-1a",
        region: Optional[str] = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ):
        self.instance_id = instance_id
        self.instance_type = instance_type
        self.availability_zone = availability_zone
        self.region = region or availability_zone.rstrip("abcdefghijklmnopqrstuvwxyz")
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._tokens: Dict[str, float] = {}  # token -> monotonic expiry
        self._spot: Optional[dict] = None
        self._rebalance: Optional[dict] = None
        self._faults: List[tuple] = []  # queued ("status", code) or ("delay", seconds), one per request
        self._counts: Counter = Counter()
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    def start(self) -> ImdsServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name=f"imds-{self.port}", daemon=True)
            self._thread.start()
            log.debug("IMDS server listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=SHUTDOWN_POLL_SECONDS)

    def __enter__(self) -> ImdsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- injection ---------------------------------------------------------------------------------------------

    def inject_spot_notice(self, action: str = "terminate", seconds_from_now: float = 120) -> dict:
        """Publish an interruption notice; returns the JSON body the instance-action path now serves."""
        if action not in SPOT_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(SPOT_ACTIONS)}, got {action!r}")
        notice = {"action": action, "time": _imds_time(self._now() + timedelta(seconds=seconds_from_now))}
        with self._lock:
            self._spot = notice
        return dict(notice)

    def inject_rebalance(self, seconds_ago: float = 0) -> dict:
        notice = {"noticeTime": _imds_time(self._now() - timedelta(seconds=seconds_ago))}
        with self._lock:
            self._rebalance = notice
        return dict(notice)

    def clear(self) -> None:
        """Remove notices, recommendations and pending faults (tokens and counts stay)."""
        with self._lock:
            self._spot = None
            self._rebalance = None
            self._faults.clear()

    def fail_next(self, count: int = 1, status: int = 500) -> None:
        """The next `count` requests (token PUTs included, control requests excluded) answer `status`."""
        with self._lock:
            self._faults.extend([("status", int(status))] * int(count))

    def delay_next(self, count: int = 1, seconds: float = 5.0) -> None:
        """The next `count` requests wait `seconds` before they answer normally."""
        with self._lock:
            self._faults.extend([("delay", float(seconds))] * int(count))

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    # -- observation -------------------------------------------------------------------------------------------

    def count(self, path: str, method: Optional[str] = None) -> int:
        """How many requests reached `path` (all methods, or only `method`)."""
        with self._lock:
            return sum(n for (m, p), n in self._counts.items() if p == path and (method is None or m == method))

    @property
    def request_counts(self) -> Dict[str, int]:
        """{"METHOD /path": n} for every request except control requests."""
        with self._lock:
            return {f"{m} {p}": n for (m, p), n in sorted(self._counts.items())}

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # -- request handling (called from handler threads) --------------------------------------------------------

    def _next_fault(self) -> Optional[tuple]:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _issue_token(self, ttl_header: Optional[str]) -> tuple:
        try:
            ttl = int(ttl_header) if ttl_header is not None else None
        except ValueError:
            ttl = None
        if ttl is None or not 1 <= ttl <= MAX_TOKEN_TTL_SECONDS:
            return 400, "text/plain", "Bad Request"
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self._clock() + ttl
        return 200, "text/plain", token

    def _token_valid(self, token: Optional[str]) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._tokens.get(token)
            if expiry is None:
                return False
            if self._clock() >= expiry:
                del self._tokens[token]
                return False
            return True

    def _metadata(self, path: str) -> Optional[tuple]:
        with self._lock:
            spot, rebalance = self._spot, self._rebalance
        meta = "/latest/meta-data/"
        plain = {
            meta + "instance-id": self.instance_id,
            meta + "instance-type": self.instance_type,
            meta + "placement/availability-zone": self.availability_zone,
            meta + "placement/region": self.region,
        }
        if path in plain:
            return "text/plain", plain[path]
        if path == meta + "spot/instance-action" and spot:
            return "application/json", json.dumps(spot)
        if path == meta + "spot/termination-time" and spot and spot["action"] == "terminate":
            return "text/plain", spot["time"]
        if path == meta + "events/recommendations/rebalance" and rebalance:
            return "application/json", json.dumps(rebalance)
        if path == "/latest/dynamic/instance-identity/document":
            doc = {
                "instanceId": self.instance_id,
                "instanceType": self.instance_type,
                "availabilityZone": self.availability_zone,
                "region": self.region,
                "architecture": "x86_64",
                "imageId": "ami-00000000000000000",
                "privateIp": "127.0.0.1",
                "pendingTime": _imds_time(self._now()),
            }
            return "application/json", json.dumps(doc, indent=2)
        return None

    def _control(self, method: str, path: str, query: dict) -> tuple:
        name = path[len(CONTROL_PREFIX):]

        def arg(key: str, default: str) -> str:
            return query.get(key, [default])[0]

        try:
            if method == "GET" and name == "counts":
                return 200, "application/json", json.dumps(self.request_counts)
            if method != "POST":
                return 405, "text/plain", "use POST"
            if name == "spot-notice":
                body = self.inject_spot_notice(arg("action", "terminate"), float(arg("seconds", "120")))
                return 200, "application/json", json.dumps(body)
            if name == "rebalance":
                return 200, "application/json", json.dumps(self.inject_rebalance(float(arg("seconds_ago", "0"))))
            if name == "clear":
                self.clear()
                return 200, "text/plain", "cleared"
            if name == "fail":
                self.fail_next(int(arg("count", "1")), int(arg("status", "500")))
                return 200, "text/plain", "ok"
            if name == "delay":
                self.delay_next(int(arg("count", "1")), float(arg("seconds", "5")))
                return 200, "text/plain", "ok"
            if name == "expire-tokens":
                self.expire_tokens()
                return 200, "text/plain", "ok"
        except ValueError as e:
            return 400, "text/plain", f"bad argument: {e}"
        return 404, "text/plain", "unknown control endpoint"

    def handle(self, method: str, raw_path: str, headers) -> tuple:
        """(status, content type, body) for one request."""
        parts = urlsplit(raw_path)
        path = parts.path
        if path.startswith(CONTROL_PREFIX):
            return self._control(method, path, parse_qs(parts.query))
        with self._lock:
            self._counts[(method, path)] += 1
        fault = self._next_fault()
        if fault is not None and fault[0] == "delay":
            time.sleep(fault[1])
        elif fault is not None:
            return fault[1], "text/plain", "Internal Server Error"
        if path == TOKEN_PATH:
            if method != "PUT":
                return 405, "text/plain", "Method Not Allowed"
            if headers.get("X-Forwarded-For"):
                return 403, "text/plain", "Forbidden"
            return self._issue_token(headers.get(TOKEN_TTL_HEADER))
        if method != "GET":
            return 405, "text/plain", "Method Not Allowed"
        if not self._token_valid(headers.get(TOKEN_HEADER)):
            return 401, "text/plain", "Unauthorized"
        found = self._metadata(path)
        if found is None:
            return 404, "text/plain", "Not Found"
        return (200,) + found


def _make_handler(server: ImdsServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "EC2ws"
        sys_version = ""

        def _answer(self) -> None:
            status, ctype, body = server.handle(self.command, self.path, self.headers)
            data = body.encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test): nothing to do
                pass

        def _drain_body(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer()

        def do_PUT(self) -> None:  # noqa: N802
            self._drain_body()
            self._answer()

        def do_POST(self) -> None:  # noqa: N802
            self._drain_body()
            self._answer()

        def log_message(self, fmt: str, *args) -> None:
            log.debug("imds %s: " + fmt, self.address_string(), *args)

    return Handler


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_dev.imds_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here (atomically) once listening")
    parser.add_argument("--instance-id", default="i-0123456789abcdef0")
    parser.add_argument("--instance-type", default="c6i.large")
    parser.add_argument("--availability-zone", default="us-east-1a")
    parser.add_argument("--region", default=None, help="default: the zone without its letter")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    server = ImdsServer(args.host, args.port, instance_id=args.instance_id, instance_type=args.instance_type,
                        availability_zone=args.availability_zone, region=args.region)

    def stop(signum, frame):  # serve_forever runs in this thread, so shut it down from another one
        threading.Thread(target=server._httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"{server.port}\n")
        os.replace(tmp, args.port_file)
    print(f"listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
