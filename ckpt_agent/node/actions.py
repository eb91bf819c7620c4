"""What the node agent does with each kind of notice, and which rebalance actions exist: one table each.

The keys are the allowed values everywhere else: `agent.rebalance_action` in agent.yaml (node/config.py) and
`queues[].checkpoint.rebalance_action` in the site file (site/schema.py) both accept exactly REBALANCE_ACTIONS; the
agent dispatches notices and rebalance actions through these tables only (node/agent.py `NoticeHandler`). A notice of
a kind not in NOTICE_HANDLERS (a new IMDS notice the adapter learnt before the agent did) is logged as unknown and
ignored: it is never mistaken for one of the known kinds.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

# notice kind (the `kind` of the adapters/imds.py notice classes) -> NoticeHandler method
NOTICE_HANDLERS = {
    "spot-interruption": "on_spot",  # drain, final checkpoints against the deadline, requeue
    "rebalance-recommendation": "on_rebalance",  # the configured REBALANCE_ACTIONS entry
}

# agent.rebalance_action -> NoticeHandler method, called with (registrations, job ids, notice)
REBALANCE_ACTIONS = {
    "checkpoint": "rebalance_checkpoint",  # an immediate non-final checkpoint of every job here
    "drain": "rebalance_drain",  # Slurm starts nothing new here
    "ignore": "rebalance_ignore",  # record the notice only
}
DEFAULT_REBALANCE_ACTION = "checkpoint"


def notice_handler(handler: Any, notice: Any) -> Optional[Callable[[Any], None]]:
    """The method of `handler` for `notice`'s kind; None (logged) for a kind this agent does not know."""
    kind = getattr(notice, "kind", None)
    name = NOTICE_HANDLERS.get(kind) if isinstance(kind, str) else None
    if name is None:
        log.error("unknown notice kind %r (%r): ignored; this agent handles %s", kind, notice,
                  ", ".join(NOTICE_HANDLERS))
        return None
    return getattr(handler, name)


def rebalance_action(handler: Any, action: str) -> Callable[..., None]:
    """The method of `handler` for a rebalance action (validated by the config schemas: a KeyError is a bug)."""
    return getattr(handler, REBALANCE_ACTIONS[action])
