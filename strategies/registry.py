"""Name -> strategy factory, for built-ins and entry-point plug-ins.

A factory is a callable ``(params: dict, common: dict) -> flwr Strategy`` where
``common`` holds the sampling settings every strategy takes (fraction-train,
min-train-nodes, ...) and ``params`` the strategy's own settings from the run
config's ``strategy-params`` (snake_case names). A factory raises ``ValueError`` or
``TypeError`` for a parameter it does not take; it may carry a ``traits`` attribute
(:class:`strategies.compatibility.StrategyTraits`).

Plug-ins register factories in the ``sepal.strategies`` entry-point group; only the
chosen one is imported, so a broken plug-in cannot stop runs that do not use it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from flwr.serverapp.strategy import Strategy

from sepal.config import ConfigError
from strategies import builtin
from strategies.compatibility import UNDECLARED, StrategyTraits

ENTRY_POINT_GROUP = "sepal.strategies"

StrategyFactory = Callable[[dict[str, Any], dict[str, Any]], Strategy]


class StrategyError(ConfigError):
    """The configured strategy is unknown or cannot be built from its settings."""


def available_strategies() -> list[str]:
    plugins = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(builtin.FACTORIES) | plugins)


def strategy_factory(name: str) -> StrategyFactory:
    if name in builtin.FACTORIES:  # a plug-in cannot shadow a built-in name
        return builtin.FACTORIES[name]
    found = [entry for entry in entry_points(group=ENTRY_POINT_GROUP) if entry.name == name]
    if not found:
        raise StrategyError(f"run config 'strategy': unknown strategy {name!r}; available: "
                            f"{available_strategies()} (plug-ins register in the "
                            f"'{ENTRY_POINT_GROUP}' entry-point group)")
    entry = found[0]
    try:
        factory = entry.load()
    except Exception as err:  # an import error inside a third-party package
        raise StrategyError(f"run config 'strategy': plug-in {name!r} ({entry.value}) failed "
                            f"to load: {type(err).__name__}: {err}") from err
    if not callable(factory):
        raise StrategyError(f"run config 'strategy': plug-in {name!r} ({entry.value}) is not "
                            "a factory (params, common) -> Strategy")
    return factory


def strategy_traits(name: str) -> StrategyTraits:
    traits = getattr(strategy_factory(name), "traits", None)
    return traits if isinstance(traits, StrategyTraits) else UNDECLARED


def build_strategy(name: str, params: dict[str, Any], common: dict[str, Any]) -> Strategy:
    factory = strategy_factory(name)
    try:
        strategy = factory(params, common)
    except (TypeError, ValueError) as err:
        raise StrategyError(f"run config 'strategy-params' for strategy {name!r}: {err}") from err
    if not isinstance(strategy, Strategy):
        raise StrategyError(f"strategy {name!r}: its factory returned {type(strategy).__name__}, "
                            "not a flwr.serverapp.strategy.Strategy")
    return strategy
