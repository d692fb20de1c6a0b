"""Strategy plug-ins, chosen by name in the run config (``strategy``).

Built-ins wrap ``flwr.serverapp.strategy`` classes; third-party packages register
more under the ``sepal.strategies`` entry-point group (see README, "Writing a
strategy plug-in").
"""

from strategies.registry import StrategyError, available_strategies, build_strategy

__all__ = ["StrategyError", "available_strategies", "build_strategy"]
