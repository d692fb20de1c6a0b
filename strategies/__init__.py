"""Strategy plug-ins, chosen by name in the run config (``strategy``, ``strategy-params``).

The run-config section that picks one is ``sepal.strategy_config.StrategyConfig``.
Built-ins wrap ``flwr.serverapp.strategy`` classes; third-party packages register
more under the ``sepal.strategies`` entry-point group (see docs/strategies.md). ``compatibility`` says which wrappers compose with which
strategy; ``state`` reads and restores a strategy's state for checkpoints.
"""

from strategies.registry import (
    ENTRY_POINT_GROUP,
    StrategyError,
    available_strategies,
    build_strategy,
    strategy_factory,
    strategy_traits,
)

__all__ = ["ENTRY_POINT_GROUP", "StrategyError", "available_strategies",
           "build_strategy", "strategy_factory", "strategy_traits"]
