"""Centered clipping, a Byzantine-robust aggregator, as a Sepal strategy plug-in.

Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization"
(ICML 2021). Starting from the current global model ``v``, repeat ``iterations`` times::

    v <- v + 1/n * sum_i (x_i - v) * min(1, tau / ||x_i - v||)

where ``x_i`` are the client models. Each client moves the result by at most
``tau / n`` per iteration, however far away its model is, while clients close to
the centre count fully (unlike a median, which ignores how far they agree).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.compatibility import StrategyTraits


class CenteredClipping(FedAvg):
    def __init__(self, *, tau: float = 1.0, iterations: int = 3, **fedavg: Any):
        super().__init__(**fedavg)
        if tau <= 0:
            raise ValueError(f"'tau' must be > 0, got {tau}")
        if iterations < 1:
            raise ValueError(f"'iterations' must be >= 1, got {iterations}")
        self.tau = tau
        self.iterations = iterations
        self.current_arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.current_arrays is None:
            return None, None
        contents = [reply.content for reply in valid]
        models = [content[self.arrayrecord_key].to_numpy_ndarrays() for content in contents]
        center = self.current_arrays.to_numpy_ndarrays()
        for _ in range(self.iterations):
            steps = [self._clipped([x - c for x, c in zip(model, center)]) for model in models]
            center = [c + np.mean(step, axis=0) for c, step in zip(center, zip(*steps))]
        arrays = ArrayRecord({key: Array(np.asarray(value, dtype=np.float32))
                              for key, value in zip(self.current_arrays.keys(), center)})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _clipped(self, difference: list[np.ndarray]) -> list[np.ndarray]:
        norm = float(np.sqrt(sum(np.square(d, dtype=np.float64).sum() for d in difference)))
        scale = min(1.0, self.tau / norm) if norm > 0 else 1.0
        return [d * scale for d in difference]


def centered_clip(params: dict[str, Any], common: dict[str, Any]) -> CenteredClipping:
    """The factory Sepal calls: ``params`` from ``strategy-params`` (tau, iterations)."""
    return CenteredClipping(**common, **params)


# What Sepal's start-up checks need to know (strategies/compatibility.py): it reads every
# client's update, so it cannot run behind secure aggregation or central DP.
centered_clip.traits = StrategyTraits(
    needs_individual_updates=True, weighted_mean=False, server_state=False,
    summary="centered clipping of the individual updates")
