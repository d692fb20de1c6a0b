"""Which wrappers compose soundly with which strategies, checked once at start-up.

A strategy declares :class:`StrategyTraits`; a wrapper (compression, secure
aggregation, central DP, ...) declares what it hides or needs in a :class:`Wrapper`.
:func:`check_composition` raises :class:`CompositionError` saying why a combination
is unsound before the first round, instead of a run that silently computes the
wrong thing.

Rules:

* secure aggregation reveals only the sum of the updates, so nothing that reads a
  single client's update can run behind it: neither a robust aggregator (median,
  trimmed mean, Krum and Bulyan compare updates) nor a wrapper that clips each update
  on the server;
* central DP (Flower's ``DifferentialPrivacy*`` wrappers) adds noise of std
  ``noise x clip / n`` to what the inner strategy returns. That is calibrated to the
  sensitivity of a *mean* of clipped updates, so the strategy must aggregate by a
  (weighted) mean and keep no server-side state computed from the un-noised mean
  (FedAvgM's momentum and FedAdam/FedYogi/FedAdagrad's moments are updated *before*
  the wrapper adds noise and would carry un-noised information into later releases).

A plug-in declares its traits as a ``traits`` attribute of its factory; one that
declares none is assumed to need individual updates and to be neither a mean nor
stateless, so it runs alone and under compression but not behind these wrappers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from sepal.config import ConfigError


class CompositionError(ConfigError):
    """A wrapper cannot be put around the chosen strategy; the message says why."""


@dataclasses.dataclass(frozen=True)
class StrategyTraits:
    needs_individual_updates: bool  # reads each client's update (robust statistics, distances)
    weighted_mean: bool             # the new model is a weighted mean of the client models
    server_state: bool              # keeps state across rounds derived from the aggregate
    summary: str = ""               # how it aggregates, for error messages


UNDECLARED = StrategyTraits(needs_individual_updates=True, weighted_mean=False, server_state=True,
                            summary="declares no traits (set `traits` on its factory)")

MEAN = StrategyTraits(False, True, False, "a weighted mean")
MEAN_WITH_SERVER_OPTIMIZER = StrategyTraits(False, True, True,
                                            "a weighted mean followed by a server optimizer step")
ROBUST = StrategyTraits(True, False, False, "a robust statistic of the individual updates")


@dataclasses.dataclass(frozen=True)
class Wrapper:
    name: str
    hides_individual_updates: bool = False
    needs_individual_updates: bool = False
    needs_stateless_mean: bool = False


COMPRESSION = Wrapper("compression")  # decodes each upload before the strategy: composes with all
SECURE_AGGREGATION = Wrapper("secure-aggregation", hides_individual_updates=True)
CENTRAL_DP = Wrapper("central-dp", needs_stateless_mean=True)
SERVER_SIDE_CLIPPING = Wrapper("server-side-clipping", needs_individual_updates=True)


def check_composition(strategy: str, traits: StrategyTraits,
                      wrappers: Iterable[Wrapper]) -> None:
    wrappers = list(wrappers)
    readers = [w for w in wrappers if w.needs_individual_updates]
    for hider in (w for w in wrappers if w.hides_individual_updates):
        if traits.needs_individual_updates:
            raise CompositionError(
                f"strategy '{strategy}' cannot run behind {hider.name}: {hider.name} reveals "
                f"only the sum of the updates, but '{strategy}' aggregates by {traits.summary}, "
                "which needs each client's update")
        if readers:
            raise CompositionError(
                f"{readers[0].name} cannot be combined with {hider.name}: it reads each "
                f"client's update, and {hider.name} reveals only their sum")
    for wrapper in (w for w in wrappers if w.needs_stateless_mean):
        if not traits.weighted_mean:
            raise CompositionError(
                f"{wrapper.name} cannot wrap strategy '{strategy}': its noise is calibrated to "
                f"the sensitivity of a mean of clipped updates, but '{strategy}' aggregates by "
                f"{traits.summary}, whose sensitivity to one client is larger (Krum can pass "
                "one client's update through whole)")
        if traits.server_state:
            raise CompositionError(
                f"{wrapper.name} cannot wrap strategy '{strategy}': '{strategy}' keeps server "
                "state (momentum or adaptive moments) computed from the aggregate before the "
                "noise is added, so later rounds would release un-noised information")


def aggregates_by_weighted_mean(traits: StrategyTraits, wrappers: Iterable[Wrapper]) -> bool:
    """True when the round's aggregate is a weighted mean that one pre-averaged reply
    reproduces: the strategy is mean-based and reads no individual update, and no active
    wrapper reads one. The server then sums uploads as they arrive instead of holding
    them all (``server/streaming.py``)."""
    return (traits.weighted_mean and not traits.needs_individual_updates
            and not any(w.needs_individual_updates for w in wrappers))


def active_wrappers(run_config: Mapping[str, Any]) -> list[Wrapper]:
    """The wrappers a run config switches on.

    Reads the switches other sections own: ``secure-aggregation`` (bool) and
    ``user-dp`` (``off`` or ``{server,client}-{fixed,adaptive}``); absent keys mean off.
    Compression is always on (the dense codec is one too) and composes with everything.
    """
    wrappers = [COMPRESSION]
    if run_config.get("secure-aggregation", False) is True:
        wrappers.append(SECURE_AGGREGATION)
    user_dp = str(run_config.get("user-dp", "off"))
    if user_dp != "off":
        wrappers.append(CENTRAL_DP)
        if user_dp.startswith("server"):
            wrappers.append(SERVER_SIDE_CLIPPING)
    return wrappers
