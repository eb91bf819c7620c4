"""Watch IMDS for Spot interruption notices and rebalance recommendations. Observes only: returns each notice
once; the agent's handler decides what to do."""

from __future__ import annotations

import logging
from typing import List, Set, Union

from ckpt_agent.adapters.imds import ImdsClient, RebalanceNotice, SpotNotice

log = logging.getLogger(__name__)

Notice = Union[SpotNotice, RebalanceNotice]


class InterruptionMonitor:
    def __init__(self, imds: ImdsClient):
        self.imds = imds
        self._seen: Set[Notice] = set()

    def poll(self) -> List[Notice]:
        """New notices since the last poll; raises ImdsError when IMDS cannot be asked (the caller retries).

        The Spot notice is asked first: when both are pending, the interruption matters more.
        """
        found: List[Notice] = []
        spot = self.imds.get_spot_notice()
        if spot is not None and spot not in self._seen:
            self._seen.add(spot)
            found.append(spot)
        rebalance = self.imds.get_rebalance_recommendation()
        if rebalance is not None and rebalance not in self._seen:
            self._seen.add(rebalance)
            found.append(rebalance)
        return found
