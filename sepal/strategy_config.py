"""The run-config section that picks the strategy (``strategy``, ``strategy-params``)."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from sepal.config import ConfigError, parse_section, require

# name=value pairs separated by commas and/or spaces; a value may be quoted
_PAIR = re.compile(r"\s*([^=,\s]+)\s*=\s*('[^']*'|\"[^\"]*\"|[^,\s]+)\s*(?:,|\s|$)")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """``strategy``: a built-in or plug-in name; ``strategy-params``: its parameters.

    ``strategy-params`` is one string of ``name=value`` pairs (kebab-case names, TOML
    values), e.g. ``"eta=0.001, beta-1=0.9"``. One string rather than a key per
    parameter because Flower rejects run-config keys the app does not declare, and a
    plug-in installed later cannot add keys to this app's pyproject.
    """

    strategy: str = dataclasses.field(default="fedavg", metadata={
        "help": "A built-in strategy (`fedavg`, `fedprox`, `fedavgm`, `fedadam`, ...) or an "
                "installed plug-in, by name."})
    strategy_params: str = dataclasses.field(default="", metadata={
        "help": "The strategy's parameters as one string of `name=value` pairs, e.g. `\"eta=0.001, "
                "beta-1=0.9\"`."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> StrategyConfig:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(bool(self.strategy.strip()), "strategy", "must name a strategy")
        self.params()

    def params(self) -> dict[str, Any]:
        """``strategy-params`` as keyword arguments (snake_case names, typed values)."""
        return parse_params(self.strategy_params)


def parse_params(text: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    position = 0
    text = text.strip()
    while position < len(text):
        match = _PAIR.match(text, position)
        if match is None or match.end() == position:
            raise ConfigError(
                f"run config 'strategy-params': cannot read {text[position:]!r}; expected "
                "name=value pairs, e.g. \"eta=0.001, beta-1=0.9\"")
        name, raw = match.group(1), match.group(2)
        key = name.replace("-", "_")
        if key in params:
            raise ConfigError(f"run config 'strategy-params': '{name}' is given twice")
        value = _value(raw)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"run config 'strategy-params': '{name}' must be finite, got "
                              f"{raw}")
        params[key] = value
        position = match.end()
    return params


def _value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word is a string
