"""ImdsClient against the local IMDSv2 server: token life cycle, notices, identity, and failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from ckpt_agent.adapters.imds import (
    REBALANCE_PATH,
    SPOT_ACTION_PATH,
    TOKEN_PATH,
    ImdsClient,
    InstanceIdentity,
    RebalanceNotice,
    SpotNotice,
    parse_time,
)
from ckpt_agent.errors import ImdsError
from ckpt_dev.imds_server import ImdsServer

FIXED_NOW = datetime(2026, 11, 28, 8, 20, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fixed_server():
    with ImdsServer(now=lambda: FIXED_NOW) as server:
        yield server


def test_no_notice_is_none_and_token_is_reused(imds_server, imds_client):
    for _ in range(3):
        assert imds_client.get_spot_notice() is None
        assert imds_client.get_rebalance_recommendation() is None
    assert imds_server.count(TOKEN_PATH, "PUT") == 1
    assert imds_server.count(SPOT_ACTION_PATH, "GET") == 3
    assert imds_server.count(REBALANCE_PATH, "GET") == 3


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_spot_notice_is_parsed_as_aware_utc(fixed_server, action):
    body = fixed_server.inject_spot_notice(action=action, seconds_from_now=120)
    assert body == {"action": action, "time": "2026-11-28T08:22:00Z"}
    notice = ImdsClient(fixed_server.url, timeout=0.5).get_spot_notice()
    assert notice == SpotNotice(action=action, time=datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc))
    assert notice.time.utcoffset() == timedelta(0)


def test_notice_time_is_about_two_minutes_ahead(imds_server, imds_client):
    imds_server.inject_spot_notice()
    notice = imds_client.get_spot_notice()
    remaining = (notice.time - datetime.now(timezone.utc)).total_seconds()
    assert 115 <= remaining <= 121


def test_rebalance_recommendation(fixed_server):
    client = ImdsClient(fixed_server.url, timeout=0.5)
    assert client.get_rebalance_recommendation() is None
    fixed_server.inject_rebalance()
    assert client.get_rebalance_recommendation() == RebalanceNotice(notice_time=FIXED_NOW)
    assert client.get_spot_notice() is None  # a recommendation is not an interruption notice
    fixed_server.clear()
    assert client.get_rebalance_recommendation() is None


def test_instance_identity(imds_server, imds_client):
    assert imds_client.get_instance_identity() == InstanceIdentity(
        instance_id="i-0feedfacecafe0001", instance_type="c6i.large", availability_zone="us-east-1a",
        region="us-east-1")
    assert imds_client.get_metadata("/latest/meta-data/placement/region") == "us-east-1"
    assert imds_client.get_metadata("/latest/meta-data/no-such-thing") is None


def test_token_renewed_before_it_expires():
    clock = FakeClock()
    with ImdsServer(clock=clock) as server:
        client = ImdsClient(server.url, timeout=0.5, token_ttl=100, clock=clock)
        client.get_spot_notice()
        clock.now += 74  # renewal margin is a quarter of a 100 s TTL: the token is still used until 75 s
        client.get_spot_notice()
        assert server.count(TOKEN_PATH) == 1
        clock.now += 2
        client.get_spot_notice()
        assert server.count(TOKEN_PATH) == 2
        assert server.count(SPOT_ACTION_PATH) == 3  # never a 401 on the way: renewed before expiry


def test_401_fetches_a_new_token_and_retries(imds_server, imds_client):
    imds_client.get_spot_notice()
    imds_server.expire_tokens()
    imds_server.inject_spot_notice(action="stop")
    assert imds_client.get_spot_notice().action == "stop"
    assert imds_server.count(TOKEN_PATH) == 2
    assert imds_server.count(SPOT_ACTION_PATH) == 3  # ok, 401, ok


def test_5xx_raises_imds_error(imds_server):
    client = ImdsClient(imds_server.url, timeout=0.5, tries=2)
    client.get_spot_notice()
    imds_server.fail_next(2, status=503)
    with pytest.raises(ImdsError, match=r"HTTP 503 \(2 tries\)"):
        client.get_spot_notice()
    assert client.get_spot_notice() is None  # the next poll works again


def test_one_5xx_is_retried(imds_server):
    client = ImdsClient(imds_server.url, timeout=0.5, tries=2)
    imds_server.inject_spot_notice()
    imds_server.fail_next(1, status=500)
    assert client.get_spot_notice().action == "terminate"


def test_5xx_on_token_raises_imds_error(imds_server, imds_client):
    imds_server.fail_next(1, status=500)
    with pytest.raises(ImdsError, match="api/token"):
        imds_client.get_spot_notice()


def test_slow_answer_times_out_quickly(imds_server, imds_client):
    imds_client.get_spot_notice()
    imds_server.delay_next(1, seconds=3)
    started = time.monotonic()
    with pytest.raises(ImdsError, match="timed out"):
        imds_client.get_spot_notice()
    assert time.monotonic() - started < 1.5  # timeout=0.5, tries=1


def test_unreachable_endpoint_raises_imds_error():
    server = ImdsServer()
    url = server.url
    server.stop()  # the port is closed now
    with pytest.raises(ImdsError, match="api/token"):
        ImdsClient(url, timeout=0.5, tries=2).get_spot_notice()


def test_client_ignores_http_proxy(imds_server, imds_client, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # discard port: a proxy that never answers
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert ImdsClient(imds_server.url, timeout=0.5).get_spot_notice() is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-28T08:22:00Z", datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc)),
        ("2026-11-28T08:22:00.123Z", datetime(2026, 11, 28, 8, 22, 0, 123000, tzinfo=timezone.utc)),
        ("2026-11-28T09:22:00+01:00", datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc)),
        ("2026-11-28T08:22:00", datetime(2026, 11, 28, 8, 22, tzinfo=timezone.utc)),
    ],
    ids=["zulu", "fraction", "offset", "naive-means-utc"],
)
def test_parse_time(text, expected):
    assert parse_time(text) == expected


def test_parse_time_rejects_garbage():
    with pytest.raises(ValueError):
        parse_time("soon")


def test_control_endpoint_from_another_process(tmp_path):
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "ckpt_dev.imds_server", "--port", "0", "--port-file", str(port_file),
         "--instance-id", "i-0aaa", "--instance-type", "m6i.xlarge", "--availability-zone", "eu-west-1b"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "imds_server did not write its port file"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert server.stdout.readline().strip() == f"listening on {url}"
        client = ImdsClient(url, timeout=1)
        assert client.get_spot_notice() is None
        assert client.get_instance_identity().region == "eu-west-1"

        def control(path, method="POST"):
            with urllib.request.urlopen(urllib.request.Request(url + path, method=method), timeout=2) as r:
                return r.read().decode()

        control("/_control/spot-notice?action=hibernate&seconds=60")
        notice = client.get_spot_notice()
        assert notice.action == "hibernate"
        assert 55 <= (notice.time - datetime.now(timezone.utc)).total_seconds() <= 61
        control("/_control/rebalance")
        assert client.get_rebalance_recommendation() is not None
        counts = control("/_control/counts", method="GET")
        assert '"PUT /latest/api/token": 1' in counts
        control("/_control/clear")
        assert client.get_spot_notice() is None
        assert client.get_rebalance_recommendation() is None
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
