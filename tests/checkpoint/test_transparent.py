"""Transparent mode without Slurm: the site switch and its checks, what `ckpt render` emits for it, the head node's
early install of the plugin, nested `ckpt run` detection, the wrapper's stderr lines and the report's mode.
The plugin itself runs in real slurmctld in test_transparent_slurm.py."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from ckpt_helpers import REPO, ckpt_env, require_criu, run_ckpt
from test_bootstrap import Node, bundle  # noqa: F401 (the bundle fixture: the example site's real bundle)

from ckpt_agent.checkpoint.runner import NESTED_ENV, enclosing_step
from ckpt_agent.headnode.report import build_report, render_text
from ckpt_agent.site import render
from ckpt_agent.site.schema import check_site_text, load_site

EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
MINIMAL = REPO / "tests" / "data" / "site" / "minimal.yaml"


# --- site file and render ----------------------------------------------------------------------------------------
def test_switch_is_off_by_default_and_on_in_the_example():
    minimal = load_site(str(MINIMAL))
    assert all(not q["checkpoint"]["transparent"] for q in minimal["queues"])
    files = render.render_site(minimal, "minimal.yaml")
    assert "head/job_submit.lua" not in files
    cfg = yaml.safe_load(files["cluster.yaml"])
    assert "OnNodeStart" not in cfg["HeadNode"]["CustomActions"]
    assert {"JobSubmitPlugins": "lua"} not in cfg["Scheduling"]["SlurmSettings"]["CustomSlurmSettings"]

    example = load_site(str(EXAMPLE))
    assert render.transparent_queues(example) == ["sim-spot"]
    assert example["transparent"] == {"opt_out_comment": "ckpt:off", "opt_out_env": "CKPT_TRANSPARENT"}


def test_rendered_plugin_carries_the_site_decisions():
    site = copy.deepcopy(load_site(str(EXAMPLE)))
    site["queues"][1]["checkpoint"]["transparent"] = True
    site["transparent"] = {"opt_out_comment": "no-ckpt", "opt_out_env": "SKIP_CKPT"}
    lua = render.render_site(site, "site.yaml")["head/job_submit.lua"]
    assert lua.startswith("# generated from site.yaml by `ckpt render`; do not edit")  # Lua skips a '#' first line
    assert '  ["sim-spot"] = true,\n  ["sim-spot-xl"] = true,\n}\n' in lua and '["ondemand"]' not in lua
    assert 'local DEFAULT_PARTITION = "sim-spot"\n' in lua  # ParallelCluster's default: the first queue
    assert 'local OPT_OUT_COMMENT = "no-ckpt"\n' in lua and 'local OPT_OUT_ENV = "SKIP_CKPT"\n' in lua
    assert "\nckpt=/opt/ckpt-agent/venv/bin/ckpt\n" in lua
    assert '"$ckpt" run --transparent --name batch -- "$copy" "$@"' in lua


def test_lua_string_literals_escape_everything_unusual():
    assert render.lua_string('a"b\\c') == '"a\\034b\\092c"'
    assert render.lua_string("x\ny]]") == '"x\\010y]]"'
    assert render.lua_string("é") == '"\\195\\169"'


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("      enabled: false\n", "      enabled: false\n      transparent: true\n"),
     "queues[2].checkpoint.transparent: needs checkpointing: set checkpoint.enabled: true"),
    (lambda t: t.replace("    KillWait: 60\n", "    KillWait: 60\n    JobSubmitPlugins: lua,pbs\n"),
     "slurm.settings.JobSubmitPlugins: set by ckpt to lua for transparent checkpointing (queue sim-spot)"),
    (lambda t: t.replace("opt_out_env: CKPT_TRANSPARENT", "opt_out_env: 'CKPT TRANSPARENT'"),
     "transparent.opt_out_env:"),
    (lambda t: t.replace('opt_out_comment: "ckpt:off"', 'opt_out_comment: "ckpt off"'),
     "transparent.opt_out_comment:"),
], ids=["needs-checkpointing", "job-submit-plugins-owned", "bad-env-name", "comment-with-space"])
def test_validate_checks_the_transparent_settings(edit, expected):
    text = edit(EXAMPLE.read_text())
    assert text != EXAMPLE.read_text()
    _, problems = check_site_text(text, "site.yaml")
    assert any(expected in str(p) for p in problems), problems


def test_head_start_installs_only_the_plugin_before_slurmctld(tmp_path, bundle):  # noqa: F811
    node = Node(tmp_path / "head")
    out = node.run("head-start", str(bundle))
    installed = node.root / "opt/slurm/etc/job_submit.lua"
    assert installed.read_bytes() == (bundle / "head/job_submit.lua").read_bytes()
    files = sorted(p.relative_to(node.root).as_posix() for p in node.root.rglob("*") if p.is_file())
    # no CRIU, agent, key or timer at OnNodeStart: the plugin, and the bootstrap's own log
    assert files == ["opt/slurm/etc/job_submit.lua", "var/log/ckpt-bootstrap.log"], files
    assert "installed" in out.stdout
    again = node.run("head-start", str(bundle))
    assert "job_submit.lua is current" in again.stdout


# --- the wrapper -------------------------------------------------------------------------------------------------
def test_enclosing_step_counts_only_the_same_job():
    assert enclosing_step("42", {NESTED_ENV: "42/batch"}) == "batch"
    assert enclosing_step("43", {NESTED_ENV: "42/batch"}) is None  # a job submitted from inside job 42
    assert enclosing_step("42_7", {NESTED_ENV: "42_7/batch"}) == "batch"
    assert enclosing_step("42", {}) is None and enclosing_step("42", {NESTED_ENV: "42/"}) is None


def test_nested_ckpt_run_runs_its_tool_plainly(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    env = ckpt_env(store, tmp_path / "run", **{NESTED_ENV: "501/batch", "SLURM_JOB_ID": "501"})
    res = run_ckpt("run", "--name", "sim", "--", "sh", "-c", 'echo "inside $CKPT_PROTECTED_BY"; exit 3', env=env)
    assert (res.returncode, res.stdout, res.stderr) == (3, "inside 501/batch\n", "")
    assert list(store.iterdir()) == [], "no checkpoint and no event: the outer step covers this tool"
    missing = run_ckpt("run", "--", "no-such-tool-xyz", env=env)
    assert missing.returncode == 127 and missing.stderr == "ckpt: no-such-tool-xyz: command not found\n"


def test_transparent_run_says_so_and_records_the_mode(tmp_path):
    require_criu()
    store = tmp_path / "store"
    store.mkdir()
    env = ckpt_env(store, tmp_path / "run", **{NESTED_ENV: "999/batch"})  # another job's: does not count
    res = run_ckpt("run", "--transparent", "--job-id", "502", "--name", "batch", "--", "sh", "-c",
                   'echo "$CKPT_PROTECTED_BY"', env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "502/batch\n"
    assert res.stderr == "ckpt: protected by transparent checkpointing (job 502, step batch)\n"
    evs = [json.loads(x) for x in (store / "502" / "events.jsonl").read_text().splitlines()]
    started = [e for e in evs if e["event"] == "segment_started"]
    assert [e["mode"] for e in started] == ["transparent"]


# --- the report --------------------------------------------------------------------------------------------------
def _events(mode):
    base = {"job_id": "600", "node": "node1", "instance_id": "i-1", "instance_type": "c6i.large", "step": "batch"}
    started = {**base, "event": "segment_started", "time": "2026-11-02T10:00:00Z", "how": "launched"}
    if mode:
        started["mode"] = mode
    return [started, {**base, "event": "segment_ended", "time": "2026-11-02T10:10:00Z", "how": "completed"}]


@pytest.mark.parametrize("mode, shown", [("transparent", "transparent"), ("explicit", "explicit"),
                                         (None, "explicit")], ids=["transparent", "explicit", "older-events"])
def test_report_shows_the_mode(mode, shown):
    report = build_report({"600": _events(mode)}, {})
    assert report["jobs"][0]["mode"] == shown and report["jobs"][0]["steps"][0]["mode"] == shown
    assert f"  mode: {shown} (" in render_text(report)

