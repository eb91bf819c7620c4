"""EC2 instance metadata (IMDSv2) client: Spot interruption notices, rebalance recommendations, instance identity.

The protocol, as AWS documents it:
- a session token comes from `PUT /latest/api/token` with header `X-aws-ec2-metadata-token-ttl-seconds: <ttl>`;
- every metadata request sends it as `X-aws-ec2-metadata-token`; a 401 means the token expired or is unknown,
  so the client fetches a new one and asks again (once);
- `GET /latest/meta-data/spot/instance-action` answers 404 while there is no interruption notice, and
  `{"action": "terminate|stop|hibernate", "time": "2026-11-28T08:22:00Z"}` once EC2 has scheduled one;
- `GET /latest/meta-data/events/recommendations/rebalance` answers 404, or `{"noticeTime": "..."}`.

The client caches the token and renews it before it expires. It only observes: it returns notice objects and never
acts on them. Every failure (connection refused, timeout, 5xx, malformed answer) raises ImdsError with one line;
the agent logs it and polls again. Only the standard library is used, and proxies are bypassed on purpose: the
metadata service is link-local and a proxy would answer for the wrong machine.

Which endpoint to use ($AWS_EC2_METADATA_SERVICE_ENDPOINT, config, default) is decided by `ckpt_agent.node.config`.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, ClassVar, Optional

from ckpt_agent.errors import ImdsError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
SPOT_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"

DEFAULT_TIMEOUT_SECONDS = 1.5  # IMDS answers in milliseconds; a poll every 2 s must not stall on a dead endpoint
DEFAULT_TRIES = 2  # one quick retry covers a dropped connection; the agent's next poll covers the rest
DEFAULT_TOKEN_TTL_SECONDS = 21600  # the maximum AWS allows (6 h): one token per agent run in practice
TOKEN_RENEW_MARGIN_SECONDS = 60  # renew this long before expiry (at most a quarter of the TTL) so no request races it
RETRY_PAUSE_SECONDS = 0.1  # between tries: long enough for a restarting endpoint, short against a 120 s notice
SPOT_ACTIONS = ("terminate", "stop", "hibernate")


@dataclass(frozen=True)
class SpotNotice:
    """An interruption notice: EC2 will `action` the instance at `time` (aware, UTC). Hashable, to handle it once."""

    kind: ClassVar[str] = "spot-interruption"  # node/actions.py dispatches notices by kind
    action: str
    time: datetime


@dataclass(frozen=True)
class RebalanceNotice:
    """EC2 advises that the instance is at elevated risk of interruption since `notice_time` (aware, UTC)."""

    kind: ClassVar[str] = "rebalance-recommendation"
    notice_time: datetime


@dataclass(frozen=True)
class InstanceIdentity:
    instance_id: str
    instance_type: str
    availability_zone: str
    region: str


def parse_time(text: str) -> datetime:
    """An IMDS timestamp ("2026-11-28T08:22:00Z", with or without fractions) as an aware UTC datetime."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"not a timestamp: {text!r}")
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:  # IMDS always means UTC
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


class _HttpStatus(Exception):
    def __init__(self, status: int, body: str = ""):
        super().__init__(status)
        self.status = status
        self.body = body


class ImdsClient:
    """IMDSv2 client. `clock` (monotonic seconds) is injectable so tests can expire the token without sleeping."""

    def __init__(
        self,
        base_url: str = DEFAULT_ENDPOINT,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        tries: int = DEFAULT_TRIES,
        token_ttl: int = DEFAULT_TOKEN_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if tries < 1:
            raise ValueError("tries must be >= 1")
        if not 1 <= token_ttl <= 21600:
            raise ValueError("token_ttl must be between 1 and 21600 seconds (the range IMDS accepts)")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.tries = tries
        self.token_ttl = int(token_ttl)
        self._clock = clock
        self._token: Optional[str] = None
        self._token_renew_at = 0.0
        self._token_lock = threading.Lock()  # the agent polls spot and rebalance from one loop, but be safe
        # An opener without proxy handling: IMDS is link-local and must never go through $http_proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- public API --------------------------------------------------------------------------------------------

    def get_spot_notice(self) -> Optional[SpotNotice]:
        """The pending interruption notice, or None when there is none (IMDS answers 404)."""
        body = self.get_metadata(SPOT_ACTION_PATH)
        if body is None:
            return None
        data = self._json(SPOT_ACTION_PATH, body)
        action = data.get("action")
        if action not in SPOT_ACTIONS:
            raise ImdsError(f"IMDS {SPOT_ACTION_PATH}: unknown action {action!r}")
        return SpotNotice(action=action, time=self._time(SPOT_ACTION_PATH, data.get("time")))

    def get_rebalance_recommendation(self) -> Optional[RebalanceNotice]:
        """The rebalance recommendation, or None when there is none (IMDS answers 404)."""
        body = self.get_metadata(REBALANCE_PATH)
        if body is None:
            return None
        data = self._json(REBALANCE_PATH, body)
        return RebalanceNotice(notice_time=self._time(REBALANCE_PATH, data.get("noticeTime")))

    def get_instance_identity(self) -> InstanceIdentity:
        """Instance id, type, availability zone and region, from the identity document or the meta-data paths."""
        body = self.get_metadata(IDENTITY_DOCUMENT_PATH)
        if body is not None:
            doc = self._json(IDENTITY_DOCUMENT_PATH, body)
            try:
                return InstanceIdentity(
                    instance_id=str(doc["instanceId"]),
                    instance_type=str(doc["instanceType"]),
                    availability_zone=str(doc["availabilityZone"]),
                    region=str(doc["region"]),
                )
            except KeyError as e:
                raise ImdsError(f"IMDS {IDENTITY_DOCUMENT_PATH}: missing field {e.args[0]}") from e
        values = {}
        for key in ("instance-id", "instance-type", "placement/availability-zone", "placement/region"):
            value = self.get_metadata(f"/latest/meta-data/{key}")
            if value is None:
                raise ImdsError(f"IMDS /latest/meta-data/{key}: not found")
            values[key] = value.strip()
        return InstanceIdentity(
            instance_id=values["instance-id"],
            instance_type=values["instance-type"],
            availability_zone=values["placement/availability-zone"],
            region=values["placement/region"],
        )

    def get_metadata(self, path: str) -> Optional[str]:
        """GET `path` with a valid token; the body as text, or None on 404. Fetches a new token once on 401."""
        try:
            return self._get_with_token(path)
        except _HttpStatus as e:
            if e.status != 401:
                raise
        log.debug("IMDS answered 401 for %s: fetching a new token", path)
        with self._token_lock:
            self._token = None
        try:
            return self._get_with_token(path)
        except _HttpStatus as e:
            raise ImdsError(f"IMDS {path}: HTTP {e.status} even with a fresh token") from None

    # -- internals ---------------------------------------------------------------------------------------------

    def _get_with_token(self, path: str) -> Optional[str]:
        token = self._valid_token()
        try:
            return self._request("GET", path, {TOKEN_HEADER: token})
        except _HttpStatus as e:
            if e.status == 404:
                return None
            if e.status == 401:
                raise
            raise ImdsError(f"IMDS {path}: HTTP {e.status}") from None

    def _valid_token(self) -> str:
        with self._token_lock:
            return self._token_locked()

    def _token_locked(self) -> str:
        now = self._clock()
        if self._token is not None and now < self._token_renew_at:
            return self._token
        try:
            body = self._request("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl)})
        except _HttpStatus as e:
            raise ImdsError(f"IMDS {TOKEN_PATH}: HTTP {e.status} for a session token") from None
        token = (body or "").strip()
        if not token:
            raise ImdsError(f"IMDS {TOKEN_PATH}: empty session token")
        margin = min(TOKEN_RENEW_MARGIN_SECONDS, self.token_ttl / 4)
        self._token = token
        self._token_renew_at = now + self.token_ttl - margin
        log.debug("IMDS session token obtained, valid for %d s", self.token_ttl)
        return token

    def _request(self, method: str, path: str, headers: dict) -> str:
        """One HTTP exchange with retries on transport errors and 5xx; other statuses raise _HttpStatus."""
        url = self.base_url + path
        last = ""
        for attempt in range(1, self.tries + 1):
            request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return response.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise _HttpStatus(e.code) from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, socket.timeout) or "timed out" in str(reason):
                    last = f"timed out after {self.timeout:g} s"
                else:
                    last = str(reason) or type(reason).__name__
            if attempt < self.tries:
                time.sleep(RETRY_PAUSE_SECONDS)
        raise ImdsError(f"IMDS {method} {path}: {last} ({self.tries} {'try' if self.tries == 1 else 'tries'})")

    @staticmethod
    def _json(path: str, body: str) -> dict:
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ImdsError(f"IMDS {path}: malformed JSON: {e}") from e
        if not isinstance(data, dict):
            raise ImdsError(f"IMDS {path}: expected a JSON object, got {type(data).__name__}")
        return data

    @staticmethod
    def _time(path: str, value) -> datetime:
        try:
            return parse_time(value)
        except (TypeError, ValueError) as e:
            raise ImdsError(f"IMDS {path}: bad timestamp {value!r}") from e
