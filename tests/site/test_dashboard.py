"""ckpt_agent.site.dashboard: the rendered CloudWatch dashboard body validates against the documented body structure
(tests/data/dashboard/dashboard-body.schema.json), lays out on the 24-unit grid without overlaps, graphs only metrics
that metrics.py or `ckpt report --cloudwatch` publish, and is created and updated through moto; the IAM policies
grant what the nodes and the uploader need."""

from __future__ import annotations

import json
import re

import boto3
import jsonschema
import pytest
from ckpt_helpers import DATA, REPO
from moto import mock_aws

from ckpt_agent.adapters import metrics
from ckpt_agent.errors import AwsError
from ckpt_agent.headnode import report
from ckpt_agent.site.dashboard import CloudWatchDashboard, dashboard_body, dashboard_name, nodes_policy, uploader_policy
from ckpt_agent.site.schema import load_site

SCHEMA = json.loads((DATA / "dashboard" / "dashboard-body.schema.json").read_text())
EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"


@pytest.fixture
def site():
    return load_site(str(EXAMPLE))


def test_body_validates_against_the_documented_structure(site):
    body = dashboard_body(site)
    jsonschema.validate(body, SCHEMA)
    committed = json.loads((REPO / "cluster-configs" / "rendered" / "eda-spot" / "dashboard.json").read_text())
    assert committed == body


def test_schema_rejects_what_cloudwatch_rejects(site):
    body = dashboard_body(site)
    bad = [
        {**body, "widgets": []},
        {"widgets": [{**body["widgets"][1], "width": 25}]},
        {"widgets": [{**body["widgets"][1], "properties": {**body["widgets"][1]["properties"], "region": None}}]},
        {"widgets": [{"type": "text", "properties": {}}]},
        {"widgets": [{**body["widgets"][1], "properties": {**body["widgets"][1]["properties"],
                                                           "metrics": [[{"expression": "x"}]]}}]},
    ]
    for b in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(b, SCHEMA)


def test_widgets_tile_the_grid_without_overlaps(site):
    cells = set()
    for w in dashboard_body(site)["widgets"]:
        assert w["x"] + w["width"] <= 24
        mine = {(x, y) for x in range(w["x"], w["x"] + w["width"]) for y in range(w["y"], w["y"] + w["height"])}
        assert not cells & mine, w["properties"].get("title")
        cells |= mine


def test_graphs_show_only_published_metrics_of_this_cluster(site):
    published = set(report_names := {name for _, name, _ in report.METRICS})
    for kind in ("checkpoint_committed", "checkpoint_failed", "notice_received", "requeued", "restored",
                 "restore_failed", "segment_started"):
        for extra in ({}, {"final": True}, {"final": True, "late": True}, {"fell_back_from": [1]},
                      {"how": "launched", "restart_count": 1}, {"seconds": 1.0}):
            published |= {d["MetricName"] for d in metrics.datums_for({"event": kind, **extra}, "c", "q")}
    shown = set()
    for w in dashboard_body(site)["widgets"]:
        for row in w["properties"].get("metrics", []):
            if isinstance(row[0], dict):
                expr = row[0]["expression"]
                assert "{CkptAgent,ClusterName,InstanceType,Queue}" in expr and 'ClusterName="eda-spot"' in expr
                shown.add(re.search(r'MetricName="(\w+)"', expr).group(1))
            else:
                assert row[0] == "CkptAgent" and row[2:4] == ["ClusterName", "eda-spot"] and row[1] in report_names
                shown.add(row[1])
    assert shown <= published, shown - published
    assert {"CheckpointDuration", "FrozenTime", "CheckpointBytesNew", "CheckpointFailures", "NoticesReceived",
            "FinalCheckpointInTime", "FinalCheckpointLate", "Requeues", "Restores", "RestoreFailures",
            "StoreBandwidth", "WorkLostHours", "SpotCostUSD", "OnDemandCostUSD"} <= shown


def test_iam_policies(site):
    nodes = nodes_policy(site)["Statement"]
    assert [s["Action"] for s in nodes] == ["cloudwatch:PutMetricData", "sns:Publish"]
    assert nodes[0]["Condition"] == {"StringEquals": {"cloudwatch:namespace": "CkptAgent"}}
    assert nodes[1]["Resource"] == "arn:aws:sns:us-east-1:123456789012:eda-spot-alerts"
    bus = {**site, "monitoring": {**site["monitoring"], "sns_topic_arn": None, "event_bus": "ops", "metrics": False}}
    assert nodes_policy(bus)["Statement"] == [{"Sid": "CkptNotifyEvents", "Effect": "Allow",
                                               "Action": "events:PutEvents",
                                               "Resource": "arn:aws:events:us-east-1:*:event-bus/ops"}]
    up = uploader_policy(site)["Statement"][0]
    assert "cloudwatch:PutDashboard" in up["Action"] and up["Resource"].endswith(":dashboard/ckpt-eda-spot")


def test_created_and_updated_through_moto(site, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        cw = boto3.client("cloudwatch", region_name="us-east-1")
        board = CloudWatchDashboard(cw)
        board.put(dashboard_name(site), dashboard_body(site))
        changed = dashboard_body(site)
        changed["widgets"][0]["properties"]["markdown"] += " (updated)"
        board.put(dashboard_name(site), changed)
        names = [d["DashboardName"] for d in cw.list_dashboards()["DashboardEntries"]]
        assert names == ["ckpt-eda-spot"]
        got = json.loads(cw.get_dashboard(DashboardName="ckpt-eda-spot")["DashboardBody"])
        assert got == changed


def test_aws_error_is_one_line(site):
    class Refusing:
        def put_dashboard(self, **kw):
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "not allowed"}}, "PutDashboard")

    with pytest.raises(AwsError, match="dashboard ckpt-eda-spot: CloudWatch PutDashboard: AccessDenied: not allowed"):
        CloudWatchDashboard(Refusing()).put("ckpt-eda-spot", dashboard_body(site))


def test_nodes_policy_arn_is_attached_to_every_node_and_passes_the_pcluster_schema(site):
    import yaml

    from ckpt_agent.site.render import render_site

    arn = "arn:aws:iam::123456789012:policy/ckpt-eda-spot-monitoring"
    with_policy = {**site, "monitoring": {**site["monitoring"], "nodes_policy_arn": arn}}
    text = render_site(with_policy, "site.example.yaml")["cluster.yaml"]
    cluster = yaml.safe_load(text)
    assert cluster["HeadNode"]["Iam"]["AdditionalIamPolicies"] == [{"Policy": arn}]
    for queue in cluster["Scheduling"]["SlurmQueues"]:
        assert queue["Iam"]["AdditionalIamPolicies"] == [{"Policy": arn}]
    assert "AdditionalIamPolicies" not in render_site(site, "site.example.yaml")["cluster.yaml"]
    pytest.importorskip("pcluster")
    from ckpt_agent.site import pcluster_check

    assert pcluster_check.check_schema(text) == []


def test_site_monitoring_problems_are_located(tmp_path):
    from ckpt_agent.site.schema import SiteInvalid

    text = EXAMPLE.read_text().replace("  dedupe_window: 1h", "  dedupe_window: 1h\n  event_bus: ops")
    text = text.replace("  namespace: CkptAgent", "  namespace: 'bad namespace!'")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(SiteInvalid) as e:
        load_site(str(path))
    problems = "\n".join(map(str, e.value.problems))
    assert "monitoring: set at most one of 'sns_topic_arn' and 'event_bus'" in problems
    assert "monitoring.namespace" in problems
