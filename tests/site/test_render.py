"""`ckpt render`: golden files, the agent.yaml contract with config.py, quoting, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml
from ckpt_helpers import DATA, REPO

from ckpt_agent import cli
from ckpt_agent.errors import EXIT_USAGE, ConfigError
from ckpt_agent.node.config import load_agent_config
from ckpt_agent.site import render
from ckpt_agent.site.schema import load_site

EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
COMMITTED = REPO / "cluster-configs" / "rendered" / "eda-spot"

GOLDEN = [
    (EXAMPLE, COMMITTED),
    (DATA / "site" / "minimal.yaml", DATA / "render" / "minimal"),
]


def tree(root: Path) -> dict:
    """Every file's bytes, with the bundle version (a hash of the whole package, so it changes with any source
    change) replaced: the golden files pin everything else; test_bundle_version_* pin the version's behaviour."""
    return {p.relative_to(root).as_posix(): re.sub(rb"\bb-[0-9a-f]{12}\b", b"b-VERSION", p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("site_path, golden", GOLDEN, ids=["committed-example", "minimal"])
def test_fresh_render_matches_committed_files_byte_for_byte(tmp_path, site_path, golden):
    rc = cli.main(["render", str(site_path), "--out", str(tmp_path / "out")])
    assert rc == 0
    fresh, expected = tree(tmp_path / "out"), tree(golden)
    assert sorted(fresh) == sorted(expected), "file set differs: run `ckpt render` and commit the result"
    for rel in expected:
        assert fresh[rel] == expected[rel], f"{rel} differs from {golden / rel}: render again and commit"


def test_every_agent_yaml_loads_with_the_agent_config_loader(tmp_path):
    site = load_site(str(EXAMPLE))
    files = render.render_site(site, "site.example.yaml")
    render.write_tree(str(tmp_path), files)
    agent_files = sorted(rel for rel in files if rel.endswith("agent.yaml"))
    assert agent_files == ["head/agent.yaml", "nodes/ondemand/agent.yaml", "nodes/sim-spot-xl/agent.yaml",
                           "nodes/sim-spot/agent.yaml"]
    for rel in agent_files:
        cfg = load_agent_config(str(tmp_path / rel))
        assert cfg.store == "/fsx/ckpt"
        assert cfg.agent.key_file == render.NODE_KEY_FILE
        assert cfg.gc.max_age == 14 * 86400 and cfg.gc.low_watermark == 75.0
    spot = load_agent_config(str(tmp_path / "nodes/sim-spot/agent.yaml"))
    assert spot.queue == "sim-spot"
    assert spot.checkpoint.interval == 900 and spot.checkpoint.keep == 2
    assert spot.checkpoint.extra_paths == ["/scratch"]
    assert spot.agent.poll_interval == 2.0 and spot.agent.rebalance_action == "checkpoint"
    assert spot.agent.cpu_families == ["r6i", "r6a", "r5"]
    assert spot.prices == {"r6i.4xlarge": {"spot": 0.41, "ondemand": 1.008},
                           "r6a.4xlarge": {"spot": 0.37, "ondemand": 0.9072}}
    xl = load_agent_config(str(tmp_path / "nodes/sim-spot-xl/agent.yaml"))
    assert (xl.checkpoint.interval, xl.checkpoint.keep, xl.prices) == (600, 3, {})
    # issue 14's settings: streaming and the age of a periodic checkpoint that may stand in for a final one
    assert (spot.checkpoint.stream, spot.checkpoint.recent_periodic) == ("auto", None)  # None: one interval
    assert (xl.checkpoint.stream, xl.checkpoint.recent_periodic) == ("auto", 300)


def test_stream_and_recent_periodic_reach_the_queues_agent_yaml(tmp_path):
    added = "      stream: always\n      dirty_tracking: false\n      chunk_digest: sha256\n"
    text = EXAMPLE.read_text().replace("      keep: 3\n", "      keep: 3\n" + added, 1)
    text = text.replace("recent_periodic: 5m ", "recent_periodic: 0  ", 1)
    site_file = tmp_path / "site.yaml"
    site_file.write_text(text)
    render.write_tree(str(tmp_path / "out"), render.render_site(load_site(str(site_file)), "site.yaml"))
    xl = load_agent_config(str(tmp_path / "out" / "nodes/sim-spot-xl/agent.yaml"))
    assert (xl.checkpoint.stream, xl.checkpoint.recent_periodic) == ("always", 0)  # 0: always try the final
    assert xl.checkpoint.dirty_tracking is False
    assert xl.checkpoint.chunk_digest == "sha256"
    spot = load_agent_config(str(tmp_path / "out" / "nodes/sim-spot/agent.yaml"))
    assert (spot.checkpoint.stream, spot.checkpoint.recent_periodic) == ("auto", None)
    assert spot.checkpoint.dirty_tracking is True  # the default is not written out
    assert spot.checkpoint.chunk_digest == "blake3"
    assert "chunk_digest" not in (tmp_path / "out" / "nodes/sim-spot/agent.yaml").read_text()


def test_cluster_yaml_content():
    site = load_site(str(EXAMPLE))
    cfg = yaml.safe_load(render.render_site(site, "site.example.yaml")["cluster.yaml"])
    uri = f"s3://my-eda-ckpt-bootstrap/ckpt-agent/eda-spot/{render.UNVERSIONED}"
    head = cfg["HeadNode"]
    action = {"Sequence": [{"Script": f"{uri}/on-node-configured.sh", "Args": ["head", uri]}]}
    start = {"Sequence": [{"Script": f"{uri}/on-node-configured.sh", "Args": ["head-start", uri]}]}  # transparent
    assert head["CustomActions"] == {"OnNodeStart": start, "OnNodeConfigured": action, "OnNodeUpdated": action}
    assert "AdditionalIamPolicies" not in head["Iam"]
    assert cfg["Scheduling"]["SlurmSettings"]["QueueUpdateStrategy"] == "DRAIN"
    access = [{"BucketName": "my-eda-ckpt-bootstrap", "KeyName": "ckpt-agent/eda-spot/*", "EnableWriteAccess": False}]
    assert head["Iam"]["S3Access"] == access
    queues = {q["Name"]: q for q in cfg["Scheduling"]["SlurmQueues"]}
    assert {n: q["CapacityType"] for n, q in queues.items()} == {
        "sim-spot": "SPOT", "sim-spot-xl": "SPOT", "ondemand": "ONDEMAND"}
    for name, q in queues.items():
        assert q["CustomActions"] == {
            "OnNodeConfigured": {"Sequence": [{"Script": f"{uri}/on-node-configured.sh",
                                               "Args": ["compute", name, uri]}]}}
        assert q["Iam"]["S3Access"] == access
    # one compute resource per CPU family: its name becomes the nodes' Slurm feature (agent.cpu_families)
    crs = queues["sim-spot"]["ComputeResources"]
    assert [(c["Name"], [i["InstanceType"] for i in c["Instances"]]) for c in crs] == [
        ("r6i", ["r6i.4xlarge"]), ("r6a", ["r6a.4xlarge"]), ("r5", ["r5.4xlarge"])]
    assert [(c["MinCount"], c["MaxCount"]) for c in crs] == [(0, 40)] * 3
    assert cfg["Scheduling"]["SlurmSettings"]["CustomSlurmSettings"] == [
        {"JobRequeue": 1}, {"JobFileAppend": 1}, {"JobSubmitPlugins": "lua"}, {"KillWait": 60}]
    fsx = cfg["SharedStorage"][0]
    assert fsx["MountDir"] == "/fsx" and fsx["StorageType"] == "FsxLustre"
    assert fsx["FsxLustreSettings"]["StorageCapacity"] == 2400
    assert cfg["Tags"] == [{"Key": "cost-center", "Value": "4711"}, {"Key": "project", "Value": "eda-regression"}]


def test_s3_criu_source_in_another_bucket_gets_read_access():
    site = load_site(str(EXAMPLE))
    site["criu"]["source"] = "s3://tools-mirror/criu/criu_4.2.1.orig.tar.xz"
    files = render.render_site(site, "site.example.yaml")
    cfg = yaml.safe_load(files["cluster.yaml"])
    assert cfg["HeadNode"]["Iam"]["S3Access"][1] == {
        "BucketName": "tools-mirror", "KeyName": "criu/criu_4.2.1.orig.tar.xz", "EnableWriteAccess": False}
    assert "CRIU_SOURCE=s3://tools-mirror/criu/criu_4.2.1.orig.tar.xz" in files["head/node.env"]


def test_head_builds_criu_only_when_some_queue_checkpoints():
    site = load_site(str(EXAMPLE))
    assert "CKPT_CHECKPOINT_ENABLED=1\n" in render.render_site(site, "s.yaml")["head/node.env"]
    for queue in site["queues"]:
        queue["checkpoint"]["enabled"] = False
    files = render.render_site(site, "s.yaml")
    assert "CKPT_CHECKPOINT_ENABLED=0\n" in files["head/node.env"]
    assert "CKPT_CHECKPOINT_ENABLED=0\n" in files["nodes/sim-spot/node.env"]


def test_every_file_says_it_is_generated():
    files = render.render_site(load_site(str(EXAMPLE)), "site.example.yaml")
    for rel, text in files.items():
        if rel.endswith(".json"):  # JSON has no comments: the dashboard body and the IAM policy documents
            assert rel in ("dashboard.json", "iam/nodes-monitoring-policy.json", "iam/uploader-dashboard-policy.json",
                           "iam/head-node-policy.json")
            json.loads(text)
            continue
        assert text.startswith("# generated from site.example.yaml by `ckpt render`; do not edit"), rel
        assert text.endswith("\n"), rel


def test_node_env_values_survive_the_shell():
    site = copy.deepcopy(load_site(str(EXAMPLE)))
    site["storage"]["mount_dir"] = "/fsx $(touch /tmp/pwned) 'x'"
    site["storage"]["checkpoint_dir"] = "ck;pt"
    text = render.render_site(site, "s.yaml")["nodes/sim-spot/node.env"]
    script = text + '\nprintf "%s\\n" "$CKPT_MOUNT_DIR" "$CKPT_STORE" "$CKPT_QUEUE" "$CKPT_CHECKPOINT_ENABLED"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["/fsx $(touch /tmp/pwned) 'x'", "/fsx $(touch /tmp/pwned) 'x'/ck;pt", "sim-spot", "1"]


def test_cron_entry_and_unit():
    files = render.render_site(load_site(str(EXAMPLE)), "site.example.yaml")
    cron = [ln for ln in files["head/ckpt-gc.cron"].splitlines() if ln and not ln.startswith(("#", "SHELL", "PATH"))]
    assert cron == ["*/15 * * * * root flock -n /run/ckpt-gc.lock /opt/ckpt-agent/venv/bin/ckpt gc "
                    "--config /etc/ckpt-agent/agent.yaml >>/var/log/ckpt-gc.log 2>&1",
                    "17 * * * * root /opt/ckpt-agent/venv/bin/ckpt report --config /etc/ckpt-agent/agent.yaml "
                    "--since 7d --cloudwatch CkptAgent --cluster eda-spot --region us-east-1 >/dev/null "
                    "2>>/var/log/ckpt-report.log"]
    unit = files["systemd/ckpt-agent.service"]
    assert "ExecStart=/opt/ckpt-agent/venv/bin/ckpt agent --config /etc/ckpt-agent/agent.yaml\n" in unit
    assert "RequiresMountsFor=/fsx\n" in unit
    # issue 12: Slurm's commands on PATH, hardening, registrations kept across restarts
    for line in ("Environment=PATH=/opt/slurm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "Restart=always", "OOMScoreAdjust=-900", "RuntimeDirectoryPreserve=yes", "StartLimitBurst=10"):
        assert f"{line}\n" in unit, line
    timer, service = files["head/ckpt-gc.timer"], files["head/ckpt-gc.service"]
    assert "OnCalendar=*-*-* *:0/15:00\n" in timer and "Persistent=true\n" in timer
    assert "ExecStart=/opt/ckpt-agent/venv/bin/ckpt gc --config /etc/ckpt-agent/agent.yaml\n" in service
    assert "Environment=PATH=/opt/slurm/bin:" in service and "RequiresMountsFor=/fsx\n" in service
    assert "\nPATH=/opt/slurm/bin:" in files["head/ckpt-gc.cron"]


@pytest.mark.parametrize("schedule, calendar", [
    ("*/15 * * * *", "*-*-* *:0/15:00"),
    ("0 3 * * *", "*-*-* 3:0:00"),
    ("30 2 * * 1-5", "Mon..Fri *-*-* 2:30:00"),
    ("0 */6 1,15 * *", "*-*-1,15 0/6:0:00"),
])
def test_cleanup_schedule_as_a_systemd_calendar(schedule, calendar):
    assert render.oncalendar(schedule) == calendar


def test_custom_actions_sequence_keeps_the_admins_scripts():
    site = load_site(str(EXAMPLE))
    mine = {"script": "s3://admin/before.sh", "args": ["x"]}
    site["head_node"]["custom_actions"]["on_node_configured"]["before"] = [mine]
    site["queues"][0]["custom_actions"]["on_node_configured"]["after"] = [{"script": "https://h/a.sh", "args": []}]
    site["queues"][0]["custom_actions"]["on_node_start"] = [{"script": "s3://admin/start.sh", "args": []}]
    cfg = yaml.safe_load(render.render_site(site, "s.yaml")["cluster.yaml"])
    head = cfg["HeadNode"]["CustomActions"]
    assert [a["Script"] for a in head["OnNodeConfigured"]["Sequence"]][0] == "s3://admin/before.sh"
    assert [a["Script"].rsplit("/", 1)[1] for a in head["OnNodeConfigured"]["Sequence"]] == [
        "before.sh", "on-node-configured.sh"]
    assert len(head["OnNodeUpdated"]["Sequence"]) == 1
    q = cfg["Scheduling"]["SlurmQueues"][0]["CustomActions"]
    assert [a["Script"].rsplit("/", 1)[1] for a in q["OnNodeConfigured"]["Sequence"]] == ["on-node-configured.sh",
                                                                                          "a.sh"]
    assert q["OnNodeStart"] == {"Sequence": [{"Script": "s3://admin/start.sh", "Args": []}]}


def test_iam_policies_per_node_type_and_the_head_nodes_own():
    site = load_site(str(EXAMPLE))
    site["iam"]["account_id"] = "123456789012"
    site["head_node"]["iam"]["additional_policies"] = ["arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy"]
    site["queues"][1]["iam"]["additional_policies"] = ["arn:aws:iam::123456789012:policy/eda-licenses"]
    files = render.render_site(site, "s.yaml")
    cfg = yaml.safe_load(files["cluster.yaml"])
    assert cfg["HeadNode"]["Iam"]["AdditionalIamPolicies"] == [
        {"Policy": "arn:aws:iam::123456789012:policy/ckpt-eda-spot-head-node"},
        {"Policy": "arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy"}]
    queues = cfg["Scheduling"]["SlurmQueues"]
    assert "AdditionalIamPolicies" not in queues[0]["Iam"]
    assert queues[1]["Iam"]["AdditionalIamPolicies"] == [{"Policy": "arn:aws:iam::123456789012:policy/eda-licenses"}]
    policy = json.loads(files["iam/head-node-policy.json"])
    actions = sorted(a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str)
                                                               else st["Action"]))
    assert actions == ["cloudwatch:PutMetricData", "ec2:DescribeSpotPriceHistory", "pricing:GetProducts"]
    metrics = [st for st in policy["Statement"] if st["Action"] == "cloudwatch:PutMetricData"][0]
    assert metrics["Condition"] == {"StringEquals": {"cloudwatch:namespace": "CkptAgent"}}


def test_head_agent_yaml_carries_each_queues_keep_and_the_cluster(tmp_path):
    site = load_site(str(EXAMPLE))
    files = render.render_site(site, "s.yaml")
    (tmp_path / "agent.yaml").write_text(files["head/agent.yaml"])
    cfg = load_agent_config(str(tmp_path / "agent.yaml"))
    assert cfg.gc.queue_keep == {"sim-spot": 2, "sim-spot-xl": 3}
    assert (cfg.cluster, cfg.slurm_bin_dir) == ("eda-spot", "/opt/slurm/bin")


def test_render_is_deterministic():
    site = load_site(str(EXAMPLE))
    assert render.render_site(site, "a.yaml") == render.render_site(copy.deepcopy(site), "a.yaml")


def test_strict_undefined(tmp_path, monkeypatch):
    for name in render.TEMPLATE_FILES:
        (tmp_path / name).write_text("{{ header }}\n")
    (tmp_path / "cluster.yaml.j2").write_text("{{ header }}\nRegion: {{ site.cluster.no_such_key }}\n")
    monkeypatch.setenv("CKPT_TEMPLATES_DIR", str(tmp_path))
    assert render.templates_dir() == tmp_path
    with pytest.raises(jinja2.UndefinedError):
        render.render_site(load_site(str(EXAMPLE)), "site.example.yaml")


def test_templates_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_TEMPLATES_DIR", str(tmp_path))
    monkeypatch.setattr(render, "PACKAGE_DIR", tmp_path / "pkg")
    with pytest.raises(ConfigError, match="templates not found"):
        render.templates_dir()


def test_write_tree_is_atomic_and_removes_stale_queues(tmp_path):
    site = load_site(str(EXAMPLE))
    render.write_tree(str(tmp_path), render.render_site(site, "s.yaml"))
    (tmp_path / "nodes" / "mine.txt").write_text("not generated")
    site["queues"] = site["queues"][:1]
    written = render.write_tree(str(tmp_path), render.render_site(site, "s.yaml"))
    assert "nodes/sim-spot/agent.yaml" in written
    assert not (tmp_path / "nodes" / "ondemand").exists()
    assert (tmp_path / "nodes" / "mine.txt").exists()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()], "temporary files left behind"
    assert oct(os.stat(tmp_path / "cluster.yaml").st_mode & 0o777) == "0o644"


def test_render_invalid_site_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["render", str(DATA / "site" / "invalid.yaml"), "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "queues[0].allocation_strategy: a Spot queue cannot use 'prioritized'" in err
    assert not out.exists()


def test_render_unwritable_out_is_a_config_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["render", str(EXAMPLE), "--out", str(blocker / "sub")]) == 78
    assert "cannot write rendered files" in capsys.readouterr().err
