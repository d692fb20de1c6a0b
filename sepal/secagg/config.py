"""Run-config section of secure aggregation (keys ``secure-aggregation``, ``secagg-*``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sepal.config import parse_section, require

MAX_VALUE_BITS = 24  # keeps b <= 62 for any realistic federation


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    secure_aggregation: bool = dataclasses.field(default=False, metadata={
        "help": "Sum the updates with SecAgg+ so that the server learns only the sum of a round's "
                "updates."})
    secagg_clip: float = dataclasses.field(default=0.05, metadata={
        "help": "c: every update coordinate is clipped to [-c, c] before it is quantized."})
    secagg_value_bits: int = dataclasses.field(default=16, metadata={
        "help": "q: a site's coordinate becomes an integer of q bits (2 to 24), stochastically "
                "rounded."})
    secagg_max_examples: int = dataclasses.field(default=1000, metadata={
        "help": "W: a site's weight in the sum is min(examples, W) / W."})
    secagg_threshold: float = dataclasses.field(default=0.667, metadata={
        "help": "Fraction of a site's neighbourhood whose shares rebuild its secrets: t = max(2, "
                "ceil(fraction x neighbourhood size)); each site enforces its own floor from "
                "node config (default 2/3, never 1/2 or less)."})
    secagg_neighbours: int = dataclasses.field(default=0, metadata={
        "help": "Neighbours per site in the masking graph; 0 = 3 ceil(log2 n), the complete graph "
                "up to 13 sites."})
    secagg_stage_timeout: float = dataclasses.field(default=300.0, metadata={
        "help": "Seconds the server waits at each key, share and unmask stage."})
    secagg_authenticated: bool = dataclasses.field(default=True, metadata={
        "help": "Clients sign their round keys and survivor sets with their institution's "
                "provisioned key and check their neighbours' against the site's roster; false "
                "holds only against a server that follows the protocol."})

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
