"""Name -> strategy factory, for built-ins and entry-point plug-ins.

A factory is a callable ``(params: dict, common: dict) -> flwr Strategy`` where
``common`` holds the sampling settings every strategy takes (fraction-train,
min-train-nodes, ...) and ``params`` the strategy's own settings from the run
config (keys prefixed ``strategy-``, prefix removed).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import Strategy

from strategies import builtin

ENTRY_POINT_GROUP = "sepal.strategies"

StrategyFactory = Callable[[dict[str, Any], dict[str, Any]], Strategy]


class StrategyError(ValueError):
    """The configured strategy is unknown or cannot be built from its settings."""


def available_strategies() -> dict[str, StrategyFactory]:
    found: dict[str, StrategyFactory] = dict(builtin.FACTORIES)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            continue  # a built-in name cannot be shadowed by a plug-in
        found[entry.name] = entry.load()
    return found


def build_strategy(name: str, params: dict[str, Any], common: dict[str, Any]) -> Strategy:
    factories = available_strategies()
    if name not in factories:
        raise StrategyError(
            f"run config 'strategy': unknown strategy {name!r}; available: {sorted(factories)}"
        )
    try:
        return factories[name](params, common)
    except TypeError as err:
        raise StrategyError(f"strategy {name!r}: bad parameters {params}: {err}") from err
