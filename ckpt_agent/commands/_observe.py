"""Wiring for the entry points that emit events (`ckpt agent`, `ckpt run`): the CloudWatch publisher and the
notifier become event sinks when the configuration enables them. At exit each gets at most EXIT_FLUSH seconds (or
`monitoring.timeout`, if shorter) to flush what is queued: a wrapper never waits longer for an external system."""

from __future__ import annotations

import atexit
import logging
from typing import Any, List

from ckpt_agent.store import events

log = logging.getLogger(__name__)

EXIT_FLUSH = 3.0


def install_sinks(cfg: Any) -> List[Any]:
    sinks: List[Any] = []
    m = cfg.monitoring
    try:
        if m.metrics:
            from ckpt_agent.adapters.metrics import publisher_from_config

            sinks.append(publisher_from_config(cfg))
        if m.sns_topic_arn or m.event_bus:
            from ckpt_agent.adapters.notify import notifier_from_config

            sinks.append(notifier_from_config(cfg))
    except Exception as e:  # botocore's errors (no region, bad endpoint): monitoring never stops a job
        log.warning("monitoring disabled: %s", e)
    for sink in sinks:
        events.add_sink(sink)
        atexit.register(sink.close, min(m.timeout, EXIT_FLUSH))
    return sinks
