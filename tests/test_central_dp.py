"""User-level DP: Flower's central-DP wrappers around a real FedAvg, with accounting.

Replies are built as the server's upload decoding builds them (``arrays`` = global +
update, ``metrics``); the Grid only has to list connected nodes for FedAvg's sampling.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Metadata
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from sepal import wire
from sepal.config import ConfigError, RunConfig
from sepal.privacy import UserLevelDPConfig, clip_update
from server.central_dp import UserLevelDP, wrap_with_user_level_dp
from server.privacy_monitor import PrivacyMonitor
from server.uploads import decode_replies

NODES = [11, 22, 33]
CFG = RunConfig(min_train_nodes=3, min_available_nodes=3)
DIM = 6


class ConnectedNodes(Grid):
    """The part of a Grid that strategies' sampling reads: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def run_identity():
    """Messages built outside a running ServerApp need the task's identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def reply(node: int, update: np.ndarray, examples: int, **metrics) -> Message:
    content = RecordDict({
        wire.ARRAYS_KEY: wire.arrays_to_record(OrderedDict(w=update.astype(np.float32))),
        wire.METRICS_KEY: MetricRecord({wire.NUM_EXAMPLES: examples, "train-loss": 0.5, **metrics}),
    })
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"m{node}", group_id="1", created_at=time.time(),
                        ttl=60.0, message_type="train")
    return Message(content=content, metadata=metadata)


def run_round(strategy: UserLevelDP, server_round: int, updates: dict[int, np.ndarray]):
    messages = list(strategy.configure_train(server_round, wire.arrays_to_record(
        OrderedDict(w=np.zeros(DIM, np.float32))), ConfigRecord(), ConnectedNodes(NODES)))
    replies = [reply(node, updates[node], examples=10 ** (i + 1))
               for i, node in enumerate(NODES) if node in updates]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return messages, arrays


def opacus_gaussian_epsilon(noise_multipliers: list[float], delta: float) -> float:
    """Opacus' RDP analysis (not Flower's dp-accounting) of unsampled Gaussian releases."""
    accountant = RDPAccountant()
    accountant.history = [(z, 1.0, 1) for z in noise_multipliers]
    return accountant.get_epsilon(delta)


def test_server_side_fixed_clipping_weighs_clients_equally_and_accounts_epsilon():
    settings = UserLevelDPConfig(user_dp="server-fixed", user_dp_noise_multiplier=1e-3,
                                   user_dp_clipping_norm=0.5)
    strategy = wrap_with_user_level_dp(FedAvg(min_train_nodes=3, min_available_nodes=3),
                                       settings, ConnectedNodes(NODES), CFG)
    assert isinstance(strategy, UserLevelDP) and strategy.num_sampled_clients == 3
    # node i moves coordinate i by 10(i+1); the three hold 10, 100, 1000 examples
    updates = {node: np.eye(DIM)[i] * 10 * (i + 1) for i, node in enumerate(NODES)}
    _, arrays = run_round(strategy, 1, updates)
    aggregate = arrays["w"].numpy()
    # each update clipped to 0.5, then the plain mean: 0.5 / 3 on each moved coordinate
    np.testing.assert_allclose(aggregate[:3], 0.5 / 3, atol=2e-3)
    np.testing.assert_allclose(aggregate[3:], 0.0, atol=2e-3)
    spent = strategy.privacy_spent()
    assert spent.num_releases == 1 and spent.delta == 1e-5


def test_fixed_clipping_epsilon_matches_an_independent_accountant_and_skips_partial_rounds():
    settings = UserLevelDPConfig(user_dp="client-fixed", user_dp_noise_multiplier=1.0)
    strategy = wrap_with_user_level_dp(FedAvg(min_train_nodes=3, min_available_nodes=3),
                                       settings, ConnectedNodes(NODES), CFG)
    updates = {node: np.full(DIM, 0.01) for node in NODES}
    for server_round in (1, 2):
        messages, arrays = run_round(strategy, server_round, updates)
        assert all(m.content[wire.CONFIG_KEY][KEY_CLIPPING_NORM] == 1.0 for m in messages)
        assert arrays is not None
    assert strategy.privacy_spent().epsilon == pytest.approx(
        opacus_gaussian_epsilon([1.0, 1.0], 1e-5), rel=1e-3)
    # a round with a missing reply: Flower's accounted wrapper releases nothing
    _, arrays = run_round(strategy, 3, {NODES[0]: updates[NODES[0]], NODES[1]: updates[NODES[1]]})
    assert arrays is None and strategy.privacy_spent().num_releases == 2


def test_adaptive_clipping_norm_grows_when_most_updates_are_clipped():
    settings = UserLevelDPConfig(user_dp="server-adaptive", user_dp_noise_multiplier=0.01,
                                   user_dp_clipped_count_stddev=0.01, user_dp_clipping_norm=0.1,
                                   user_dp_clip_norm_lr=0.2, user_dp_target_quantile=0.5)
    strategy = wrap_with_user_level_dp(FedAvg(min_train_nodes=3, min_available_nodes=3),
                                       settings, ConnectedNodes(NODES), CFG)
    run_round(strategy, 1, {node: np.full(DIM, 5.0) for node in NODES})  # all far above 0.1
    # C <- C exp(lr (clipped fraction - target)) with a clipped fraction of ~1
    assert strategy.clipping_norm() == pytest.approx(0.1 * math.exp(0.2 * 0.5), rel=2e-3)
    run_round(strategy, 2, {node: np.full(DIM, 1e-4) for node in NODES})  # none clipped
    assert strategy.clipping_norm() == pytest.approx(0.1, rel=3e-3)


def test_adaptive_clipping_epsilon_counts_each_release_with_its_replies():
    z, count_stddev = 1.0, 1.0
    settings = UserLevelDPConfig(user_dp="client-adaptive", user_dp_noise_multiplier=z,
                                   user_dp_clipped_count_stddev=count_stddev)
    strategy = wrap_with_user_level_dp(FedAvg(min_train_nodes=3, min_available_nodes=3),
                                       settings, ConnectedNodes(NODES), CFG)
    updates = {node: np.full(DIM, 0.01) for node in NODES}
    replies = [reply(node, updates[node], 10, **{KEY_NORM_BIT: 0}) for node in NODES]
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), ConnectedNodes(NODES))
    assert strategy.aggregate_train(1, replies)[0] is not None
    assert strategy.privacy_spent().epsilon == pytest.approx(
        opacus_gaussian_epsilon([z], 1e-5), rel=1e-3)
    strategy.aggregate_train(2, replies[:2])  # 2 of the 3 sampled
    # Flower splits z: update noise (z^-2 - (2 sigma_b)^-2)^-1/2, scaled to 3 clients
    update_noise = (z ** -2 - (2 * count_stddev) ** -2) ** -0.5
    partial = ((update_noise * 2 / 3) ** -2 + (2 * count_stddev) ** -2) ** -0.5
    assert strategy.privacy_spent().epsilon == pytest.approx(
        opacus_gaussian_epsilon([z, partial], 1e-5), rel=1e-3)


def test_user_level_delta_must_be_below_one_over_the_number_of_clients():
    settings = UserLevelDPConfig(user_dp="server-fixed", user_dp_delta=0.5)
    with pytest.raises(ConfigError, match=r"'user-dp-delta' 0.5 must be below 1/number of clients"):
        wrap_with_user_level_dp(FedAvg(), settings, ConnectedNodes(NODES), CFG)
    adaptive = UserLevelDPConfig(user_dp="server-adaptive", user_dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="'user-dp-clipped-count-stddev'"):
        wrap_with_user_level_dp(FedAvg(), adaptive, ConnectedNodes(NODES), CFG)


def test_client_side_clipping_bounds_the_update_before_it_is_encoded():
    config = ConfigRecord({KEY_CLIPPING_NORM: 1.0})
    adaptive = UserLevelDPConfig(user_dp="client-adaptive")
    big = OrderedDict(a=np.full(4, 3.0, np.float32), b=np.full(2, 4.0, np.float32))
    assert clip_update(big, config, adaptive) == {KEY_NORM_BIT: 1}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in big.values()))
    assert norm == pytest.approx(1.0, rel=1e-6)
    small = OrderedDict(a=np.full(4, 0.1, np.float32))
    assert clip_update(small, config, adaptive) == {KEY_NORM_BIT: 0}
    np.testing.assert_array_equal(small["a"], np.full(4, 0.1, np.float32))
    fixed = UserLevelDPConfig(user_dp="client-fixed")
    assert clip_update(OrderedDict(a=np.full(4, 3.0, np.float32)), config, fixed) == {}
    with pytest.raises(ValueError, match="sent no 'clipping_norm'"):
        clip_update(OrderedDict(a=np.ones(2, np.float32)), ConfigRecord(), fixed)
    assert clip_update(big, ConfigRecord(), UserLevelDPConfig(user_dp="server-fixed")) == {}


def answer(node: int, **records) -> Message:
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"m{node}", group_id="1", created_at=time.time(),
                        ttl=60.0, message_type="train")
    return Message(content=RecordDict(records), metadata=metadata)


def test_server_sorts_refusals_and_stops_when_too_few_sites_can_train():
    exhausted = ConfigRecord({"code": "budget-exhausted", "reason": "next round passes 2.0"})
    replies = [
        answer(11, refusal=exhausted, privacy=ConfigRecord({"epsilon": 1.5, "delta": 1e-5})),
        answer(22, refusal=ConfigRecord({"code": "tired", "reason": "no"})),
    ]
    decoded = decode_replies(replies, OrderedDict(w=np.zeros(DIM, np.float32)))
    assert not decoded.accepted and "malformed refusal" in decoded.rejected[22]
    assert decoded.refused[11].code == "budget-exhausted"
    monitor = PrivacyMonitor(min_train_nodes=2)
    record = monitor.round_record(decoded, connected_nodes=3)
    assert record["epsilon_per_client"] == {"11": 1.5} and record["sites_stopped"] == ["11"]
    assert monitor.stop_reason is None  # two sites can still train

    again = decode_replies([answer(11, refusal=exhausted), answer(33, refusal=ConfigRecord(
        {"code": "invalid-setting", "reason": "node config 'dp-delta' ..."}))],
        OrderedDict(w=np.zeros(DIM, np.float32)))
    record = monitor.round_record(again, connected_nodes=3)
    assert record["sites_stopped"] == ["11", "33"]
    assert record["run_stopped"].startswith("only 1 site(s) can still train")


def test_a_resumed_run_keeps_the_spent_epsilon_of_a_site_without_its_ledger():
    """After a resume, a site that cannot know what it spent refuses without an ε report;
    the record keeps the ε it reported before the interruption, and the site stops."""
    monitor = PrivacyMonitor(min_train_nodes=1)
    monitor.restore([{"round": 0}, {"round": 1, "epsilon_per_client": {"11": 1.5, "22": 2.5}},
                     {"round": 2, "epsilon_per_client": {"11": 2.0, "22": 2.5}}])
    unavailable = ConfigRecord({"code": "ledger-unavailable", "reason": "set 'dp-state-dir'"})
    decoded = decode_replies(
        [answer(11, refusal=unavailable),
         answer(22, refusal=ConfigRecord({"code": "budget-exhausted", "reason": "cap"}),
                privacy=ConfigRecord({"epsilon": 2.5, "delta": 1e-5}))],
        OrderedDict(w=np.zeros(DIM, np.float32)))
    assert decoded.refused[11].code == "ledger-unavailable" and 11 not in decoded.privacy
    record = monitor.round_record(decoded, connected_nodes=3)
    assert record["epsilon_per_client"] == {"11": 2.0, "22": 2.5}
    assert record["sites_stopped"] == ["11", "22"] and monitor.stop_reason is None
