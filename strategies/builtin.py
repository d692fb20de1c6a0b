"""Built-in strategies: thin factories around ``flwr.serverapp.strategy``.

Each factory builds the Flower class as is; it only maps ``strategy-params`` onto the
class's own keyword arguments (checked by name and type) and sets a few defaults
where Flower's would make the strategy a no-op or harmful for fine-tuning a
pretrained transformer:

* ``fedprox``: ``proximal-mu`` 1.0 (Flower's 0.0 is plain FedAvg; the client
  applies it as a decoupled step, see ``client/proximal.py``);
* ``fedavgm``: ``server-momentum`` 0.9 (Flower's 0.0 is plain FedAvg) with
  ``server-learning-rate`` 0.1, so that the steady-state step ``lr / (1 - momentum)``
  equals FedAvg's (Hsu et al. 2019 compare at equal effective rate); 0.9 with
  Flower's 1.0 takes 10x FedAvg's step, too much for a pretrained transformer;
* ``fedadam``, ``fedyogi``, ``fedadagrad``: ``eta`` 1e-3. Their step moves every
  weight by about ``eta`` per round (``m / sqrt(v)`` is of order 1); Flower's 0.1
  (0.01 for FedYogi) is tuned for models trained from scratch and wipes out
  pretrained BERT weights of magnitude ~0.05 in one round.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from strategies.compatibility import MEAN, MEAN_WITH_SERVER_OPTIMIZER, ROBUST, StrategyTraits

# Sampling settings every factory receives in ``common`` (from the run config's own keys).
COMMON = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
          "min_available_nodes")
# Plumbing the round loop depends on, and FedOpt's eta_l (the clients' learning rate,
# informational only, the server never uses it: clients use ``learning-rate``).
FIXED = ("weighted_by_key", "arrayrecord_key", "configrecord_key", "eta_l")


class FlowerStrategy:
    """Factory ``(params, common) -> strategy`` for one ``flwr.serverapp.strategy`` class."""

    def __init__(self, cls: type[Strategy], traits: StrategyTraits, **defaults: Any):
        self.cls = cls
        self.traits = traits
        self.defaults = defaults

    def parameters(self) -> dict[str, Any]:
        """Tunable parameter -> default (Sepal's where it sets one, else Flower's)."""
        found = {}
        for name, parameter in inspect.signature(self.cls.__init__).parameters.items():
            default = parameter.default
            if name in COMMON or name in FIXED or not isinstance(default, (bool, int, float, str)):
                continue
            found[name] = self.defaults.get(name, default)
        return found

    def __call__(self, params: dict[str, Any], common: dict[str, Any]) -> Strategy:
        accepted = self.parameters()
        for name, value in params.items():
            if name not in accepted:
                known = ", ".join(n.replace("_", "-") for n in accepted) or "none"
                raise ValueError(f"'{name.replace('_', '-')}' is not a parameter of "
                                 f"{self.cls.__name__} (it takes: {known})")
            if not _same_kind(value, accepted[name]):
                raise ValueError(f"'{name.replace('_', '-')}' must be a "
                                 f"{type(accepted[name]).__name__}, got {value!r}")
        return self.cls(**common, **{**accepted, **params})


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


SERVER_ETA = 1e-3

FACTORIES: dict[str, FlowerStrategy] = {
    "fedavg": FlowerStrategy(flwr_strategy.FedAvg, MEAN),
    "fedprox": FlowerStrategy(flwr_strategy.FedProx, MEAN, proximal_mu=1.0),
    "fedavgm": FlowerStrategy(flwr_strategy.FedAvgM, MEAN_WITH_SERVER_OPTIMIZER,
                              server_momentum=0.9, server_learning_rate=0.1),
    "fedadam": FlowerStrategy(flwr_strategy.FedAdam, MEAN_WITH_SERVER_OPTIMIZER, eta=SERVER_ETA),
    "fedyogi": FlowerStrategy(flwr_strategy.FedYogi, MEAN_WITH_SERVER_OPTIMIZER, eta=SERVER_ETA),
    "fedadagrad": FlowerStrategy(flwr_strategy.FedAdagrad, MEAN_WITH_SERVER_OPTIMIZER,
                                 eta=SERVER_ETA),
    "fedmedian": FlowerStrategy(flwr_strategy.FedMedian, ROBUST),
    "fedtrimmedavg": FlowerStrategy(flwr_strategy.FedTrimmedAvg, ROBUST),
    "krum": FlowerStrategy(flwr_strategy.Krum, ROBUST),
    "multikrum": FlowerStrategy(flwr_strategy.MultiKrum, ROBUST),
    "bulyan": FlowerStrategy(flwr_strategy.Bulyan, ROBUST),
}
