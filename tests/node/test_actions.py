"""The notice and rebalance-action tables (node/actions.py): their keys are the schemas' allowed values, every entry
names a real NoticeHandler method, and a notice of an unknown kind is logged and never handled as another kind."""

import inspect
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ClassVar

import pytest

from ckpt_agent.adapters import imds
from ckpt_agent.node import actions
from ckpt_agent.node.agent import Agent, NoticeHandler
from ckpt_agent.node.config import AgentSettings
from ckpt_agent.site.schema import CHECKPOINT

NOW = datetime(2026, 12, 3, 7, 0, tzinfo=timezone.utc)


class RecordingSlurm:
    def __init__(self):
        self.calls = []

    def drain_node(self, node, reason):
        self.calls.append(("drain", node, reason))


@dataclass(frozen=True)
class FutureNotice:
    """A notice kind IMDS may grow one day, which this agent does not know."""

    kind: ClassVar[str] = "instance-retirement"
    notice_time: datetime


class OneShotMonitor:
    def __init__(self, notices):
        self.notices = list(notices)

    def poll(self):
        out, self.notices = self.notices, []
        return out


class RecordingHandler:
    node = "node1"

    def __init__(self):
        self.calls = []

    def on_spot(self, notice):
        self.calls.append(("spot", notice))

    def on_rebalance(self, notice):
        self.calls.append(("rebalance", notice))


def test_every_notice_class_of_the_imds_adapter_has_a_handler():
    kinds = {cls.kind for _, cls in inspect.getmembers(imds, inspect.isclass) if cls.__name__.endswith("Notice")}
    assert kinds == set(actions.NOTICE_HANDLERS)


def test_every_table_entry_is_a_notice_handler_method():
    for name in [*actions.NOTICE_HANDLERS.values(), *actions.REBALANCE_ACTIONS.values()]:
        assert callable(getattr(NoticeHandler, name, None)), name


def test_the_table_keys_are_the_allowed_rebalance_actions_in_both_schemas(tmp_path):
    from ckpt_agent.node.config import AGENT_SCHEMA

    site_choices = CHECKPOINT.fields["rebalance_action"].spec.choices
    node_choices = AGENT_SCHEMA.fields["agent"].spec.fields["rebalance_action"].spec.choices
    assert tuple(site_choices) == tuple(node_choices) == tuple(actions.REBALANCE_ACTIONS)
    assert AgentSettings().rebalance_action == actions.DEFAULT_REBALANCE_ACTION in actions.REBALANCE_ACTIONS


def test_an_unknown_notice_kind_is_logged_and_not_handled_as_a_rebalance(caplog):
    handler = RecordingHandler()
    spot = imds.SpotNotice("terminate", NOW)
    agent = Agent(OneShotMonitor([FutureNotice(NOW), spot]), handler, imds=None, runtime_dir="/nonexistent",
                  poll_interval=1)
    agent.instance = {"instance_id": "i-0abc"}  # known already: no IMDS identity request
    with caplog.at_level(logging.ERROR, logger="ckpt_agent.node.actions"):
        agent.poll_once()
    assert handler.calls == [("spot", spot)], "the unknown notice reached a handler"
    assert "unknown notice kind 'instance-retirement'" in caplog.text


@pytest.mark.parametrize("action, drained", [("drain", True), ("ignore", False), ("checkpoint", False)])
def test_rebalance_actions_are_dispatched_through_the_table(tmp_path, action, drained):
    slurm = RecordingSlurm()
    handler = NoticeHandler("node1", str(tmp_path), slurm, None, AgentSettings(rebalance_action=action),
                            instance=lambda: {})
    handler.on_rebalance(imds.RebalanceNotice(NOW))
    assert [c[0] for c in slurm.calls] == (["drain"] if drained else [])
