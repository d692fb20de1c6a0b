"""The run-config section of the server's checks on every decoded update
(``server/validation.py``): the norm bound and the largest weight a site may claim."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from sepal.config import parse_section, require

MAX_SITE_EXAMPLES_LIMIT = 2**31 - 1  # weights summed in float64 stay exact


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    validation_norm_multiple: float = dataclasses.field(default=10.0, metadata={
        "help": "Reject an update whose L2 norm exceeds this multiple of the reference norm (0 "
                "switches the norm check off)."})
    validation_clip_bound: float = dataclasses.field(default=0.0, metadata={
        "help": "The reference norm, e.g. the clipping norm sites apply under DP (0 = the median "
                "norm of the round's updates)."})
    max_site_examples: int = dataclasses.field(default=100_000, metadata={
        "help": "Largest num-examples a site may declare; a reply claiming more is rejected, "
                "so no site can take the weight of the others."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ValidationConfig:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(self.validation_norm_multiple == 0 or 1 <= self.validation_norm_multiple < math.inf,
                "validation-norm-multiple", "must be 0 (off) or finite and >= 1")
        require(math.isfinite(self.validation_clip_bound) and self.validation_clip_bound >= 0,
                "validation-clip-bound", "must be finite and >= 0 (0 = use the round's median "
                "norm)")
        require(1 <= self.max_site_examples <= MAX_SITE_EXAMPLES_LIMIT, "max-site-examples",
                f"must be in [1, {MAX_SITE_EXAMPLES_LIMIT}]")
