"""What composes with what: the one rule, checked once at start-up.

A strategy declares :class:`StrategyTraits` (a ``traits`` attribute of its factory);
everything a run config puts around it declares a :class:`Wrapper`: what it hides from
the strategy or needs of it. That covers the layers around the strategy (secure
aggregation, central DP and its server-side or adaptive clipping) and the upload codec
(top-k uploads are sparse per client). :func:`check_composition` raises
:class:`CompositionError` naming both parties and why before the first round, instead
of a run that silently computes the wrong thing.

Rules:

* secure aggregation reveals only the sum of the updates, so nothing that reads a
  single client's reply can run behind it: neither a robust aggregator (median,
  trimmed mean, Krum and Bulyan compare updates) nor a wrapper that clips each update
  on the server or counts which clients were clipped (adaptive clipping);
* secure aggregation masks every coordinate of every upload, so an upload codec that
  lets each client send its own coordinates (top-k) would be densified and lose all
  its savings;
* central DP (Flower's ``DifferentialPrivacy*`` wrappers) adds noise of std
  ``noise x clip / n`` to what the inner strategy returns. That is calibrated to the
  sensitivity of a *mean* of clipped updates, so the strategy must aggregate by a
  (weighted) mean and keep no server-side state computed from the un-noised mean
  (FedAvgM's momentum and FedAdam/FedYogi/FedAdagrad's moments are updated *before*
  the wrapper adds noise and would carry un-noised information into later releases).

A plug-in that declares no traits is assumed to need individual updates and to be
neither a mean nor stateless, so it runs alone and under compression but not behind
these wrappers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sepal.codecs import parse_chain
from sepal.config import ConfigError
from sepal.settings import Settings


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
    """What one layer of the run (around the strategy, or the upload codec) hides or needs."""

    name: str
    hides_individual_updates: bool = False  # the strategy sees only the sum of the replies
    reads_individual_replies: str = ""      # what it reads in each client's reply ("" = nothing)
    needs_stateless_mean: bool = False      # its noise is calibrated to a mean of clipped updates
    needs_dense_uploads: bool = False       # every upload must cover every coordinate
    sparse_uploads: bool = False            # each client sends only coordinates it picks


COMPRESSION = Wrapper("compression")  # decodes each upload before the strategy: composes with all
SECURE_AGGREGATION = Wrapper("secure-aggregation", hides_individual_updates=True,
                             needs_dense_uploads=True)
CENTRAL_DP = Wrapper("central-dp", needs_stateless_mean=True)
SERVER_SIDE_CLIPPING = Wrapper("server-side-clipping",
                               reads_individual_replies="clips each client's update on the server")
ADAPTIVE_CLIPPING = Wrapper(
    "adaptive-clipping", reads_individual_replies="counts the clients whose update was clipped, "
    "one bit per reply, to adapt the clipping norm (use user-dp = 'client-fixed')")


def check_composition(strategy: str, traits: StrategyTraits,
                      wrappers: Iterable[Wrapper]) -> None:
    """Raise CompositionError naming the first unsound pair among the strategy and wrappers."""
    wrappers = list(wrappers)
    readers = [w for w in wrappers if w.reads_individual_replies]
    for hider in (w for w in wrappers if w.hides_individual_updates):
        if traits.needs_individual_updates:
            raise CompositionError(
                f"strategy '{strategy}' cannot run behind {hider.name}: {hider.name} reveals "
                f"only the sum of the updates, but '{strategy}' aggregates by {traits.summary}, "
                "which needs each client's update")
        if readers:
            raise CompositionError(
                f"{readers[0].name} cannot be combined with {hider.name}: it "
                f"{readers[0].reads_individual_replies}, and {hider.name} reveals only the sum "
                "of the replies")
    for masker in (w for w in wrappers if w.needs_dense_uploads):
        for sparse in (w for w in wrappers if w.sparse_uploads):
            raise CompositionError(
                f"{sparse.name} cannot be combined with {masker.name}: each client picks its "
                f"own coordinates (top-k), and {masker.name} masks every coordinate of every "
                "upload, so top-k would lose all its savings; use a dense or quantizing codec")
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
    """Whether the strategy and its wrappers aggregate the replies as a plain weighted mean
    (each reply's arrays weighted by its example count), so that the replies may be summed
    as they arrive: the strategy is a weighted mean and no wrapper reads individual replies."""
    return (traits.weighted_mean and not traits.needs_individual_updates
            and not any(w.reads_individual_replies for w in wrappers))


def active_wrappers(settings: Settings) -> list[Wrapper]:
    """The wrappers a run's settings switch on: the upload codec (top-k is sparse),
    ``secure-aggregation`` and ``user-dp`` (``off`` or ``{server,client}-{fixed,adaptive}``).
    Compression is always on (the dense codec is one too)."""
    wrappers = [COMPRESSION]
    chain = settings.compression.upload_codec
    if parse_chain(chain).topk > 0:
        wrappers.append(Wrapper(f"upload-codec {chain!r}", sparse_uploads=True))
    if settings.secagg.enabled:
        wrappers.append(SECURE_AGGREGATION)
    user_dp = settings.user_dp
    if user_dp.enabled:
        wrappers.append(CENTRAL_DP)
        if not user_dp.client_side:
            wrappers.append(SERVER_SIDE_CLIPPING)
        if user_dp.adaptive:
            wrappers.append(ADAPTIVE_CLIPPING)
    return wrappers
