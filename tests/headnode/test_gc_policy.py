"""gc's Policy is built from agent.yaml (one definition of the gc settings: node/fields.py)."""

from dataclasses import asdict

from ckpt_agent.headnode.gc import Policy
from ckpt_agent.node.config import AgentConfig, GcSettings, load_agent_config


def test_policy_is_built_from_the_config(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("checkpoint: {keep: 3}\n"
                    "gc: {grace: 2h, max_age: 7d, history_max_age: 90d, high_watermark: 90, low_watermark: 60,\n"
                    "     queue_keep: {big: 5}}\n")
    policy = Policy.from_config(load_agent_config(str(path)))
    assert asdict(policy) == {"grace": 7200, "max_age": 7 * 86400, "history_max_age": 90 * 86400, "keep": 3,
                              "high_watermark": 90.0,
                              "low_watermark": 60.0, "keep_by_queue": {"big": 5}}
    assert policy.keep_for("big") == 5 and policy.keep_for("small") == 3


def test_the_grace_flag_overrides_the_config():
    assert Policy.from_config(AgentConfig(), grace=0).grace == 0
    assert Policy.from_config(AgentConfig()).grace == GcSettings().grace


def test_policy_defaults_are_the_config_defaults():
    assert Policy() == Policy.from_config(AgentConfig())
