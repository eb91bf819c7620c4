"""The cluster's CloudWatch dashboard and the IAM policies monitoring needs.

Contract:
- `dashboard_name(site)` is `ckpt-<cluster>`; `dashboard_body(site)` the dashboard body (the structure CloudWatch's
  PutDashboard documents: {"widgets": [{"type", "x", "y", "width", "height", "properties"}]}) with one graph per
  question an admin asks: are checkpoints fast and small, are final checkpoints in time, do restores work, is the
  store keeping up, how much work was lost, what did Spot save. Graphs use SEARCH over the metrics' dimension set
  ({namespace,ClusterName,InstanceType,Queue}), so new queues and instance types appear without a re-render.
- `nodes_policy(site)` / `uploader_policy(site)`: IAM policy documents granting exactly what the nodes
  (PutMetricData in the namespace, Publish/PutEvents to the notification target) and `ckpt upload`
  (PutDashboard/GetDashboard on this dashboard) need. `ckpt render` writes them next to cluster.yaml.
- `CloudWatchDashboard(client).put(name, body)` creates or updates the dashboard; AWS failures become AwsError.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Tuple

from ckpt_agent.adapters.aws import aws_call, region_of

log = logging.getLogger(__name__)

WIDTH = 24  # the dashboard grid is 24 units wide


def dashboard_name(site: Dict[str, Any]) -> str:
    return f"ckpt-{site['cluster']['name']}"


def _search(namespace: str, cluster: str, metric: str, stat: str, period: int = 300) -> str:
    return (f"SEARCH('{{{namespace},ClusterName,InstanceType,Queue}} MetricName=\"{metric}\" "
            f"ClusterName=\"{cluster}\"', '{stat}', {period})")


def _graph(title: str, series: List[Tuple[str, str, str]], region: str, x: int, y: int, *, w: int = 12,
           h: int = 6, ylabel: str = "", namespace: str, cluster: str) -> Dict[str, Any]:
    """A time-series widget; `series` holds (metric, stat, label). Each SEARCH gives one line per queue and type."""
    metrics = [[{"expression": _search(namespace, cluster, metric, stat), "id": f"e{i}", "label": label}]
               for i, (metric, stat, label) in enumerate(series, 1)]
    props: Dict[str, Any] = {"title": title, "region": region, "view": "timeSeries", "stacked": False,
                             "period": 300, "metrics": metrics, "yAxis": {"left": {"min": 0}}}
    if ylabel:
        props["yAxis"]["left"]["label"] = ylabel
    return {"type": "metric", "x": x, "y": y, "width": w, "height": h, "properties": props}


def _summary_graph(title: str, series: List[Tuple[str, str]], region: str, x: int, y: int, *, namespace: str,
                   cluster: str, ylabel: str) -> Dict[str, Any]:
    """A widget over the head node's `ckpt report --cloudwatch` metrics (dimension ClusterName only)."""
    metrics = [[namespace, metric, "ClusterName", cluster, {"label": label}] for metric, label in series]
    return {"type": "metric", "x": x, "y": y, "width": 12, "height": 6,
            "properties": {"title": title, "region": region, "view": "timeSeries", "stacked": False,
                           "stat": "Maximum", "period": 3600, "metrics": metrics,
                           "yAxis": {"left": {"min": 0, "label": ylabel}}}}


def dashboard_body(site: Dict[str, Any]) -> Dict[str, Any]:
    region, cluster = site["cluster"]["region"], site["cluster"]["name"]
    ns = site["monitoring"]["namespace"]
    kw = {"namespace": ns, "cluster": cluster}
    target = site["monitoring"].get("sns_topic_arn") or site["monitoring"].get("event_bus") or "none configured"
    text = (f"# ckpt-agent: cluster {cluster}\n"
            f"Checkpoints, Spot interruptions, restores and savings of the checkpointing queues "
            f"({', '.join(q['name'] for q in site['queues'] if q['checkpoint']['enabled']) or 'none'}). "
            f"Namespace `{ns}`; notifications: `{target}`. Per-job detail: `ckpt report --html FILE` on the head "
            f"node.")
    widgets: List[Dict[str, Any]] = [
        {"type": "text", "x": 0, "y": 0, "width": WIDTH, "height": 2, "properties": {"markdown": text}},
        _graph("Checkpoint duration and frozen time", [("CheckpointDuration", "Average", "duration"),
                                                       ("FrozenTime", "Average", "frozen")],
               region, 0, 2, ylabel="seconds", **kw),
        _graph("Checkpoint data: new bytes per checkpoint", [("CheckpointBytesNew", "Sum", "bytes new")],
               region, 12, 2, ylabel="bytes", **kw),
        _graph("Store bandwidth seen by checkpoints", [("StoreBandwidth", "Average", "bytes/s")],
               region, 0, 8, ylabel="bytes/s", **kw),
        _graph("Checkpoint failures", [("CheckpointFailures", "Sum", "failed")], region, 12, 8, ylabel="count",
               **kw),
        _graph("Spot notices, requeues, restores", [("NoticesReceived", "Sum", "notices"),
                                                    ("Requeues", "Sum", "requeues"), ("Restores", "Sum", "restores")],
               region, 0, 14, ylabel="count", **kw),
        _graph("Final checkpoints: in time, late, failed", [("FinalCheckpointInTime", "Sum", "in time"),
                                                            ("FinalCheckpointLate", "Sum", "late"),
                                                            ("FinalCheckpointFailed", "Sum", "failed")],
               region, 12, 14, ylabel="count", **kw),
        _graph("Restores that need a look", [("RestoreFailures", "Sum", "failed"),
                                             ("RestoreFallbacks", "Sum", "fell back"),
                                             ("RestartsFromZero", "Sum", "restarted from zero")],
               region, 0, 20, ylabel="count", **kw),
        _graph("Restore duration", [("RestoreDuration", "Average", "restore")], region, 12, 20, ylabel="seconds",
               **kw),
        _summary_graph("Work lost and net runtime (ckpt report, head node)",
                       [("WorkLostHours", "work lost"), ("NetRuntimeHours", "net runtime")],
                       region, 0, 26, ylabel="hours", **kw),
        _summary_graph("Spot against On-Demand cost (ckpt report, head node)",
                       [("SpotCostUSD", "Spot"), ("OnDemandCostUSD", "On-Demand"), ("SavingsUSD", "saved")],
                       region, 12, 26, ylabel="USD", **kw),
    ]
    return {"start": "-P7D", "periodOverride": "inherit", "widgets": widgets}


def dashboard_json(site: Dict[str, Any]) -> str:
    return json.dumps(dashboard_body(site), indent=1, sort_keys=True) + "\n"


# --- IAM ---------------------------------------------------------------------------------------------------------
def _partition(region: str) -> str:
    return "aws-us-gov" if region.startswith("us-gov-") else "aws-cn" if region.startswith("cn-") else "aws"


def nodes_policy(site: Dict[str, Any]) -> Dict[str, Any]:
    m, region = site["monitoring"], site["cluster"]["region"]
    statements: List[Dict[str, Any]] = []
    if m["metrics"]:
        statements.append({"Sid": "CkptMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData",
                           "Resource": "*",  # PutMetricData has no resource; the namespace condition scopes it
                           "Condition": {"StringEquals": {"cloudwatch:namespace": m["namespace"]}}})
    if m.get("sns_topic_arn"):
        statements.append({"Sid": "CkptNotifySns", "Effect": "Allow", "Action": "sns:Publish",
                           "Resource": m["sns_topic_arn"]})
    if m.get("event_bus"):
        bus = m["event_bus"]
        arn = bus if bus.startswith("arn:") else f"arn:{_partition(region)}:events:{region}:*:event-bus/{bus}"
        statements.append({"Sid": "CkptNotifyEvents", "Effect": "Allow", "Action": "events:PutEvents",
                           "Resource": arn})
    return {"Version": "2012-10-17", "Statement": statements}


def uploader_policy(site: Dict[str, Any]) -> Dict[str, Any]:
    arn = f"arn:{_partition(site['cluster']['region'])}:cloudwatch::*:dashboard/{dashboard_name(site)}"
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "CkptDashboard", "Effect": "Allow", "Action": ["cloudwatch:PutDashboard", "cloudwatch:GetDashboard"],
         "Resource": arn}]}


# --- CloudWatch ----------------------------------------------------------------------------------------------------
class CloudWatchDashboard:
    def __init__(self, client: Any) -> None:
        self.client = client

    def put(self, name: str, body: Dict[str, Any]) -> None:
        with aws_call("CloudWatch", "PutDashboard", region=region_of(self.client), subject=f"dashboard {name}"):
            out = self.client.put_dashboard(DashboardName=name, DashboardBody=json.dumps(body))
        for p in out.get("DashboardValidationMessages") or []:  # warnings: saved, but parts may not render
            log.warning("CloudWatch dashboard %s: %s: %s", name, p.get("DataPath"), p.get("Message"))
