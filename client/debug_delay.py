"""Test-only slowdown of one SuperNode, to exercise the server's round timeout.

Node config ``debug-delay-s`` (seconds, default 0 = off) makes this node's ClientApp
sleep that long before it trains, in round ``debug-delay-round`` only (0 = every
round). It exists for the deployment tests (a slow institution whose late reply the
server must discard); a real federation never sets it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from sepal.config import parse_section, require

log = logging.getLogger("sepal.client")


@dataclasses.dataclass(frozen=True)
class DebugDelay:
    debug_delay_s: float = 0.0
    debug_delay_round: int = 0

    def validate(self) -> None:
        require(self.debug_delay_s >= 0, "debug-delay-s", "must be >= 0 seconds")
        require(self.debug_delay_round >= 0, "debug-delay-round", "must be >= 0 (0 = every round)")

    def applies(self, server_round: int) -> bool:
        return self.debug_delay_s > 0 and self.debug_delay_round in (0, server_round)


def slow_down_for_tests(node_config: Mapping[str, Any], server_round: int) -> None:
    delay = parse_section(DebugDelay, node_config)
    if delay.applies(server_round):
        log.warning("debug-delay-s: sleeping %.1fs before training round %d (test-only setting)",
                    delay.debug_delay_s, server_round)
        time.sleep(delay.debug_delay_s)
