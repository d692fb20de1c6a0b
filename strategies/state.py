"""A strategy's state across rounds: read out for a checkpoint, put back on resume.

Flower's strategies keep it in plain attributes (read from the flwr 1.42 sources):

* FedAvgM: ``current_arrays`` (ArrayRecord, the model its momentum refers to) and
  ``momentum_vector`` (list of arrays);
* FedAdam, FedYogi, FedAdagrad (FedOpt): ``m_t`` and ``v_t`` (name -> array), and
  ``current_arrays`` (name -> array, reset by every ``configure_train``);
* DifferentialPrivacy*AdaptiveClipping: ``clipping_norm``, adapted every round;
* DifferentialPrivacy*FixedClipping: an optional ``accountant`` with
  ``state_dict()`` / ``load_state_dict()`` (Flower's RdpAccountant);
* every wrapper keeps the strategy it wraps in ``.strategy`` (Flower's) or
  ``.wrapped`` (``server/central_dp.UserLevelDP``, around Flower's DP wrappers).

A plug-in with other state gives its strategy ``state_dict() -> dict`` and
``load_state_dict(dict)``; values may be numbers, strings, ``None``, lists, dicts
with string keys and numpy arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector", "clipping_norm")


class StrategyStateError(ValueError):
    """Saved strategy state does not fit the strategy it is loaded into."""


def strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """One entry per level of the wrapper chain, outermost first."""
    levels = []
    for level in _chain(strategy):
        entry: dict[str, Any] = {"class": type(level).__name__, "attributes": {}}
        for name in ATTRIBUTES:
            value = getattr(level, name, None)
            if value is not None and not callable(value):  # UserLevelDP.clipping_norm()
                entry["attributes"][name] = _encode(value)
        accountant = getattr(level, "accountant", None)
        if accountant is not None:
            entry["accountant"] = accountant.state_dict()
        if callable(getattr(level, "state_dict", None)):
            entry["custom"] = level.state_dict()
        levels.append(entry)
    return levels


def load_strategy_state(strategy: Strategy, levels: list[dict[str, Any]]) -> None:
    chain = list(_chain(strategy))
    saved = [entry["class"] for entry in levels]
    if saved != [type(level).__name__ for level in chain]:
        raise StrategyStateError(
            f"the checkpoint holds the state of {' > '.join(saved)}, but this run's strategy "
            f"is {' > '.join(type(level).__name__ for level in chain)}")
    for level, entry in zip(chain, levels):
        for name, value in entry["attributes"].items():
            setattr(level, name, _decode(value))
        if "accountant" in entry:
            level.accountant.load_state_dict(entry["accountant"])
        if "custom" in entry:
            level.load_state_dict(entry["custom"])


def _chain(strategy: Strategy) -> Iterator[Strategy]:
    level: Any = strategy
    while isinstance(level, Strategy):
        yield level
        inner = getattr(level, "strategy", None)
        level = inner if isinstance(inner, Strategy) else getattr(level, "wrapped", None)


def _encode(value: Any) -> dict[str, Any]:
    if isinstance(value, ArrayRecord):
        return {"kind": "arrayrecord", "value": {k: a.numpy() for k, a in value.items()}}
    if isinstance(value, dict):
        return {"kind": "arrays", "value": {k: np.asarray(v) for k, v in value.items()}}
    if isinstance(value, list):
        return {"kind": "array-list", "value": [np.asarray(v) for v in value]}
    if isinstance(value, (int, float)):
        return {"kind": "scalar", "value": value}
    raise StrategyStateError(f"cannot save strategy state of type {type(value).__name__}")


def _decode(encoded: dict[str, Any]) -> Any:
    kind, value = encoded["kind"], encoded["value"]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in value.items()})
    if kind == "arrays":
        return dict(value)
    if kind == "array-list":
        return list(value)
    return value
