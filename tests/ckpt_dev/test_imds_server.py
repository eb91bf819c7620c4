"""The local IMDSv2 server speaks the protocol as AWS documents it, seen with raw HTTP (no ImdsClient)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


def request(server, method, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(server.url).port, timeout=2)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def token(server, ttl="60"):
    status, body = request(server, "PUT", "/latest/api/token", {TTL: ttl})
    assert status == 200
    return body


@pytest.mark.parametrize("headers", [{}, {TTL: "0"}, {TTL: "21601"}, {TTL: "abc"}],
                         ids=["missing", "zero", "too-long", "not-a-number"])
def test_token_needs_a_valid_ttl(imds_server, headers):
    assert request(imds_server, "PUT", "/latest/api/token", headers)[0] == 400


def test_token_refused_through_a_proxy(imds_server):
    assert request(imds_server, "PUT", "/latest/api/token", {TTL: "60", "X-Forwarded-For": "10.0.0.1"})[0] == 403


def test_get_token_is_not_allowed(imds_server):
    assert request(imds_server, "GET", "/latest/api/token")[0] == 405


@pytest.mark.parametrize("headers", [{}, {TOKEN: "forged"}], ids=["no-token", "unknown-token"])
def test_metadata_needs_a_token(imds_server, headers):
    assert request(imds_server, "GET", "/latest/meta-data/instance-id", headers)[0] == 401


def test_metadata_with_token(imds_server):
    headers = {TOKEN: token(imds_server)}
    assert request(imds_server, "GET", "/latest/meta-data/instance-id", headers) == (200, "i-0feedfacecafe0001")
    assert request(imds_server, "GET", "/latest/meta-data/placement/availability-zone", headers) == (200, "us-east-1a")
    assert request(imds_server, "GET", "/latest/meta-data/spot/instance-action", headers)[0] == 404
    assert request(imds_server, "GET", "/latest/meta-data/spot/termination-time", headers)[0] == 404
    imds_server.inject_spot_notice("terminate", 120)
    status, body = request(imds_server, "GET", "/latest/meta-data/spot/instance-action", headers)
    assert status == 200 and json.loads(body)["action"] == "terminate"
    assert request(imds_server, "GET", "/latest/meta-data/spot/termination-time", headers) == (
        200, json.loads(body)["time"])
    doc = json.loads(request(imds_server, "GET", "/latest/dynamic/instance-identity/document", headers)[1])
    assert (doc["instanceId"], doc["instanceType"], doc["region"]) == ("i-0feedfacecafe0001", "c6i.large", "us-east-1")


def test_token_expires_after_its_ttl():
    from ckpt_dev.imds_server import ImdsServer

    now = [0.0]
    with ImdsServer(clock=lambda: now[0]) as server:
        headers = {TOKEN: token(server, ttl="10")}
        now[0] = 9.9
        assert request(server, "GET", "/latest/meta-data/instance-id", headers)[0] == 200
        now[0] = 10.0
        assert request(server, "GET", "/latest/meta-data/instance-id", headers)[0] == 401


def test_faults_apply_to_the_next_requests_only(imds_server):
    headers = {TOKEN: token(imds_server)}
    imds_server.fail_next(2, status=502)
    assert request(imds_server, "GET", "/latest/meta-data/instance-id", headers)[0] == 502
    assert request(imds_server, "PUT", "/latest/api/token", {TTL: "5"})[0] == 502
    assert request(imds_server, "GET", "/latest/meta-data/instance-id", headers)[0] == 200


def test_control_endpoints(imds_server):
    assert request(imds_server, "POST", "/_control/spot-notice?action=stop&seconds=30")[0] == 200
    assert request(imds_server, "POST", "/_control/spot-notice?action=explode")[0] == 400
    assert request(imds_server, "POST", "/_control/fail?count=1&status=500")[0] == 200
    assert request(imds_server, "PUT", "/latest/api/token", {TTL: "60"})[0] == 500
    headers = {TOKEN: token(imds_server)}
    assert json.loads(request(imds_server, "GET", "/latest/meta-data/spot/instance-action", headers)[1])[
        "action"] == "stop"
    assert request(imds_server, "POST", "/_control/expire-tokens")[0] == 200
    assert request(imds_server, "GET", "/latest/meta-data/instance-id", headers)[0] == 401
    assert request(imds_server, "POST", "/_control/clear")[0] == 200
    assert request(imds_server, "POST", "/_control/nothing")[0] == 404
    counts = json.loads(request(imds_server, "GET", "/_control/counts")[1])
    assert counts == {"GET /latest/meta-data/instance-id": 1, "GET /latest/meta-data/spot/instance-action": 1,
                      "PUT /latest/api/token": 2}
