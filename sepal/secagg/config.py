"""Run-config section of secure aggregation (keys ``secure-aggregation``, ``secagg-*``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sepal.config import parse_section, require

MAX_VALUE_BITS = 24  # keeps b <= 62 for any realistic federation


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    secure_aggregation: bool = False
    secagg_clip: float = 0.05          # c: each update coordinate is clipped to [-c, c]
    secagg_value_bits: int = 16        # q: one client's coordinate in [-(2^(q-1)-1), 2^(q-1)-1]
    secagg_max_examples: int = 1000    # W: weight = min(examples, W) / W
    secagg_threshold: float = 0.667    # t = max(2, ceil(fraction * neighbourhood size)); 2/3
    secagg_neighbours: int = 0         # k; 0 = 3 ceil(log2 n), complete graph when >= n - 1
    secagg_stage_timeout: float = 300.0  # seconds per key/share/unmask stage
    secagg_authenticated: bool = dataclasses.field(default=True, metadata={
        "help": "clients sign their round keys and survivor sets with their institution's "
                "provisioned key and check their neighbours' against the site's roster; false "
                "holds only against a server that follows the protocol"})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SecAggConfig:
        return parse_section(cls, values)

    @property
    def enabled(self) -> bool:
        return self.secure_aggregation

    def validate(self) -> None:
        require(self.secagg_clip > 0, "secagg-clip", "must be > 0")
        require(2 <= self.secagg_value_bits <= MAX_VALUE_BITS, "secagg-value-bits",
                f"must be in [2, {MAX_VALUE_BITS}]")
        require(self.secagg_max_examples >= 1, "secagg-max-examples", "must be >= 1")
        require(0.5 < self.secagg_threshold <= 1.0, "secagg-threshold",
                "must be a fraction in (1/2, 1] of a client's neighbourhood (clients refuse "
                "less than their site's secagg-min-threshold, 2/3 unless set)")
        require(self.secagg_neighbours >= 0, "secagg-neighbours",
                "must be >= 0 (0 = 3 ceil(log2 n))")
        require(self.secagg_stage_timeout > 0, "secagg-stage-timeout", "must be > 0 seconds")
