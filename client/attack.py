"""TEST-ONLY model-poisoning switch, for robustness tests and benchmarks.

``test-attack`` (run config) names partitions that misbehave and how, e.g.
``"0:scale, 1:sign-flip"``; ``test-attack-scale`` (default 10) is the factor:

* ``scale``     uploads ``s x update`` (a boosted update, as in model-replacement attacks);
* ``sign-flip`` uploads ``-s x update`` (pushes the model away from the honest direction).

It keys on ``partition-id``, so it applies to simulated nodes and to SuperNodes
started with a ``partition-id`` node config; never set it in a real federation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from sepal.config import parse_section, require
from sepal.task import NodeData

MODES = ("scale", "sign-flip")

log = logging.getLogger("sepal.client")


@dataclasses.dataclass(frozen=True)
class TestAttack:
    __test__ = False  # not a pytest test class

    test_attack: str = dataclasses.field(default="", metadata={
        "help": "Test-only: partitions that upload a manipulated update, e.g. `\"0:scale, 1:sign-"
                "flip\"`; never set in a real federation."})
    test_attack_scale: float = dataclasses.field(default=10.0, metadata={
        "help": "Test-only: factor of the `test-attack` manipulation."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TestAttack:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(self.test_attack_scale > 0, "test-attack-scale", "must be > 0")
        self.modes()

    def modes(self) -> dict[int, str]:
        """Partition id -> attack mode."""
        modes: dict[int, str] = {}
        for entry in filter(None, (part.strip() for part in self.test_attack.split(","))):
            partition, _, mode = (piece.strip() for piece in entry.partition(":"))
            require(partition.isdigit() and mode in MODES, "test-attack",
                    f"entry {entry!r} must look like 'PARTITION-ID:MODE' with MODE one of {MODES}")
            modes[int(partition)] = mode
        return modes


def apply_test_attack(update: OrderedDict[str, np.ndarray], attack: TestAttack,
                      node: NodeData) -> OrderedDict[str, np.ndarray]:
    mode = attack.modes().get(node.partition_id)
    if mode is None:
        return update
    factor = attack.test_attack_scale if mode == "scale" else -attack.test_attack_scale
    log.warning("TEST ATTACK: partition %d uploads %s x its update (%s)", node.partition_id,
                factor, mode)
    return OrderedDict((name, (array * factor).astype(np.float32))
                       for name, array in update.items())
