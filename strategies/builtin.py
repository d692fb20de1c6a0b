"""Built-in strategies: thin factories around ``flwr.serverapp.strategy``."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy


def fedavg(params: dict[str, Any], common: dict[str, Any]) -> Strategy:
    return FedAvg(**common, **params)


FACTORIES = {"fedavg": fedavg}
