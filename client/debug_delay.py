"""Test-only slowdown of one SuperNode, to exercise the server's round timeout.

Node config ``debug-delay-s`` (seconds, default 0 = off) holds this node's training
until that long after the server created the instruction, in round
``debug-delay-round`` only (0 = every round). Counting from the instruction, not
from the ClientApp's start, makes the reply's lateness independent of how long
process start-up takes on a busy machine. It exists for the deployment tests (a slow
institution whose late reply the server must discard); a real federation never sets it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from sepal.config import parse_section, require

log = logging.getLogger("sepal.client")


@dataclasses.dataclass(frozen=True)
class DebugDelay:
    CONFIG_SOURCE: ClassVar[str] = "node config"

    debug_delay_s: float = dataclasses.field(default=0.0, metadata={
        "help": "Test-only: hold this node's training until this many seconds after the instruction"
                " was sent (0 = off)."})
    debug_delay_round: int = dataclasses.field(default=0, metadata={
        "help": "Test-only: the round `debug-delay-s` applies to (0 = every round)."})

    def validate(self) -> None:
        require(self.debug_delay_s >= 0, "debug-delay-s", "must be >= 0 seconds")
        require(self.debug_delay_round >= 0, "debug-delay-round", "must be >= 0 (0 = every round)")

    def applies(self, server_round: int) -> bool:
        return self.debug_delay_s > 0 and self.debug_delay_round in (0, server_round)


def slow_down_for_tests(node_config: Mapping[str, Any], server_round: int,
                        sent_at: float) -> None:
    """Sleep until ``debug-delay-s`` after ``sent_at`` (the instruction's creation time)."""
    delay = parse_section(DebugDelay, node_config)
    if delay.applies(server_round):
        remaining = sent_at + delay.debug_delay_s - time.time()
        log.warning("debug-delay-s: holding round %d for %.1fs more (test-only setting)",
                    server_round, max(remaining, 0.0))
        time.sleep(max(remaining, 0.0))
