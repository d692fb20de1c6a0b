"""User-level (client-level) DP: one of Flower's central-DP wrappers around the configured
strategy, and the user-level ε of every released aggregate.

Math (DP-FedAvg, McMahan et al. 2018, as in Flower's wrappers): each of the m sampled
clients' updates is clipped to L2 norm C (by the server or by the client) and the server
releases

    (1/m) sum_i clip(update_i) + N(0, (z C / m)^2 I),

a Gaussian mechanism of noise multiplier z on the clipped sum (one client changes the sum
by at most C). Every client must count 1/m, so replies' weights are made equal before
aggregation. Adaptive clipping (Andrew et al. 2021) also releases a noisy count of clipped
updates (std sigma_b); Flower splits z between the two queries so that together they cost
one Gaussian release of multiplier z.

Client-side clipping is to the norm C less what the upload's rounding can add
(:class:`~sepal.privacy.user_level.Rounding`), so the sensitivity stays C; too coarse a
rounding is refused at start-up.

Accounting: one release per round that produced an aggregate; neighbours differ by one
client's whole clipped update replaced by zero (zero-out: the mean's denominator is the
sampled count m either way), which for a Gaussian sum costs what add/remove-one costs;
no amplification by client sampling (Flower samples without replacement from whoever is
connected, not Poisson); RDP via Flower's ``RdpAccountant`` (``flwr[dp]``,
Google's dp-accounting). Fixed clipping hands the accountant to Flower's wrapper, which
composes it and refuses to aggregate a round whose reply count differs from the sample.
Flower's adaptive wrappers take no accountant, so :class:`UserLevelDP` composes the same
kind of event after each adaptive release. ε is accounted only when the inner strategy
aggregates with FedAvg's mean, the statistic Flower's noise scale is calibrated for; around
any other strategy the wrappers still clip and add noise but ε is reported as None.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacySpent,
    SamplingMethod,
)

from sepal import wire
from sepal.config import ConfigError, RunConfig, require
from sepal.privacy.config import UserLevelDPConfig
from sepal.privacy.user_level import Rounding
from sepal.secagg.config import SecAggConfig
from server.flower_patches import ClientSideAdaptiveClipping, ServerSideAdaptiveClipping
from server.uploads import CLIENTS_KEY

log = logging.getLogger("sepal.server")


class UserLevelDP(Strategy):
    """A configured strategy under one of Flower's central-DP wrappers, with accounting."""

    def __init__(self, strategy: Strategy, settings: UserLevelDPConfig,
                 num_sampled_clients: int, population: int):
        super().__init__()
        self.settings = settings
        self.num_sampled_clients = num_sampled_clients
        self.weighted_by_key = getattr(strategy, "weighted_by_key", wire.NUM_EXAMPLES)
        self.accountant = None
        aggregates_by_mean = isinstance(strategy, FedAvg) and (
            type(strategy).aggregate_train is FedAvg.aggregate_train)
        if aggregates_by_mean:
            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=settings.user_dp_delta, population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION))
        else:
            log.warning("user-level DP around %s: noise is added but ε is not accounted "
                        "(Flower's noise is calibrated for FedAvg's mean)", type(strategy).__name__)
        self.wrapped = self._wrap(strategy)

    def _wrap(self, strategy: Strategy) -> Strategy:
        s = self.settings
        if not s.adaptive:
            fixed = (DifferentialPrivacyClientSideFixedClipping if s.client_side
                     else DifferentialPrivacyServerSideFixedClipping)
            return fixed(strategy, s.user_dp_noise_multiplier, s.user_dp_clipping_norm,
                         self.num_sampled_clients, accountant=self.accountant)
        adaptive = ClientSideAdaptiveClipping if s.client_side else ServerSideAdaptiveClipping
        try:
            return adaptive(strategy, s.user_dp_noise_multiplier, self.num_sampled_clients,
                            initial_clipping_norm=s.user_dp_clipping_norm,
                            target_clipped_quantile=s.user_dp_target_quantile,
                            clip_norm_lr=s.user_dp_clip_norm_lr,
                            clipped_count_stddev=s.user_dp_clipped_count_stddev or None)
        except ValueError as err:
            raise ConfigError(f"run config 'user-dp-clipped-count-stddev': {err}") from err

    def privacy_spent(self) -> PrivacySpent | None:
        return self.accountant.get_privacy_spent() if self.accountant is not None else None

    def clipping_norm(self) -> float:
        return float(self.wrapped.clipping_norm)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.wrapped.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [_equal_weight(reply, self.weighted_by_key)
                   for reply in replies for _ in range(_contributors(reply))]
        arrays, metrics = self.wrapped.aggregate_train(server_round, replies)
        if arrays is not None and self.settings.adaptive and self.accountant is not None:
            self.accountant.compose(GaussianPrivacyEvent(
                noise_multiplier=self._adaptive_noise_multiplier(len(replies)),
                sample_size=len(replies),
                population_size=self.accountant.config.population_size))
        return arrays, metrics

    def _adaptive_noise_multiplier(self, num_replies: int) -> float:
        """Noise multiplier of one adaptive release with ``num_replies`` of the sampled.

        Flower scales the update's noise to the sampled count m; with k < m replies the
        noise on the k-client sum is k/m as large relative to its sensitivity C. The noisy
        clipped-count query (std sigma_b, sensitivity 1/2 after centering, Andrew et al.)
        composes with it: z^-2 = (z_update k/m)^-2 + (2 sigma_b)^-2.
        """
        update = self.wrapped.noise_multiplier * num_replies / self.num_sampled_clients
        return (update ** -2 + (2 * self.wrapped.clipped_count_stddev) ** -2) ** -0.5

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.wrapped.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.wrapped.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.wrapped.summary()


def wrap_with_user_level_dp(strategy: Strategy, settings: UserLevelDPConfig, grid: Grid,
                            cfg: RunConfig) -> Strategy:
    """``strategy`` under user-level DP when ``user-dp`` is on (unchanged otherwise).

    Flower's wrappers need the number of clients sampled per round up front, so this waits,
    as FedAvg's sampling does, for ``min-available-nodes`` to connect.
    """
    if not settings.enabled:
        return strategy
    while len(list(grid.get_node_ids())) < cfg.min_available_nodes:
        time.sleep(1)
    population = len(list(grid.get_node_ids()))
    require(settings.user_dp_delta < 1 / population, "user-dp-delta",
            f"{settings.user_dp_delta:g} must be below 1/number of clients = {1 / population:g}")
    num_sampled = max(int(population * cfg.fraction_train), cfg.min_train_nodes)
    return UserLevelDP(strategy, settings, num_sampled, population)


def check_user_level_rounding(settings: UserLevelDPConfig, dim: int, upload_codec: str,
                              secagg: SecAggConfig) -> None:
    """Start-up: client-side clipping whose rounding (codec, secure aggregation) would
    break the sensitivity C stops the run with an error naming the setting; clients then
    clip to the smaller norm of :class:`~sepal.privacy.user_level.Rounding`."""
    if settings.enabled and settings.client_side:
        Rounding.of_upload(dim, upload_codec, secagg).clipping_norm(settings.user_dp_clipping_norm)


def _contributors(reply: Message) -> int:
    """Clients behind a reply: one, or ``aggregated-clients`` for the single reply of secure
    or streaming aggregation, which carries their (unweighted) mean. Flower's wrappers
    count replies, so it stands in that many times; the mean of identical replies is that
    mean."""
    if reply.has_error() or wire.METRICS_KEY not in reply.content:
        return 1
    return int(reply.content[wire.METRICS_KEY].get(CLIENTS_KEY, 1))


def _equal_weight(reply: Message, key: str) -> Message:
    """``reply`` with its aggregation weight set to 1 (a copy; the original is kept)."""
    if reply.has_error():
        return reply
    content = RecordDict()
    for name, record in reply.content.items():
        if isinstance(record, MetricRecord):
            record = MetricRecord({**record, key: 1})
        content[name] = record
    return Message(content=content, metadata=reply.metadata)
