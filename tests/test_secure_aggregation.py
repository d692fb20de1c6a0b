"""SecAgg+ rounds: the real server workflow and client handlers, real cryptography.

Messages travel through ``testing.grid.InProcessGrid`` (every content serialized to
Flower's protobuf and back); the clients' "training" returns fixed random updates
through the dense codec so that the plaintext sum is known exactly.
"""

from __future__ import annotations

import logging
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg
from scipy import stats

from client.secure_aggregation import STATE_KEY, register_secure_aggregation
from sepal import wire
from sepal.codecs import DenseCodec
from sepal.config import RunConfig
from sepal.secagg.config import SecAggConfig
from sepal.secagg.fixedpoint import FixedPoint
from sepal.secagg.identity import issue_identities
from sepal.secagg.packing import unpack
from sepal.secagg.protocol import (
    CONSISTENCY,
    MASKED_INPUT,
    MASKED_KEY,
    SETUP,
    SHARE_KEYS,
    SHARES_KEY,
    UNMASK,
    message_type,
)
from sepal.privacy import UserLevelDPConfig
from sepal.privacy.refusal import BUDGET_EXHAUSTED, PrivacyRefusal, Refusal
from server.central_dp import wrap_with_user_level_dp
from server.secure_aggregation import (
    SecureAggregation,
    SecureFederation,
)
from testing.grid import InProcessGrid

SHAPES = {"encoder.weight": (40, 25), "encoder.bias": (25,), "head": (3, 5)}
STAGES = (SETUP, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)
NODES = (101, 202, 303, 404, 505, 606)


class Federation5:
    """Six clients with known updates and example counts; t = 4 (complete graph).

    Each node is an institution with its own signing key and the shared roster in its
    node config (``site_config`` adds keys), unless ``secagg-authenticated`` is false.
    """

    def __init__(self, nodes=NODES, shapes=SHAPES, site_config=None, **config):
        rng = np.random.default_rng(0)
        self.nodes, self.shapes = list(nodes), shapes
        self.refusing: set[int] = set()  # nodes whose privacy budget is spent
        self.dim = sum(int(np.prod(s)) for s in shapes.values())
        self.updates = {n: OrderedDict((k, rng.normal(0, 0.01, s).astype(np.float32))
                                       for k, s in shapes.items()) for n in self.nodes}
        self.examples = {n: int(rng.integers(50, 1500)) for n in self.nodes}
        self.run_config = {"secure-aggregation": True, **config}
        self.config = SecAggConfig.from_mapping(self.run_config)
        self.folder = tempfile.TemporaryDirectory()
        self.site_config = {n: {} for n in self.nodes}
        if self.config.secagg_authenticated:
            issued = issue_identities(Path(self.folder.name), [f"site-{n}" for n in self.nodes])
            self.site_config = {n: issued[f"site-{n}"] for n in self.nodes}
        for node in self.nodes:
            self.site_config[node].update(site_config or {})
        app = ClientApp()
        register_secure_aggregation(app, self._train)
        self.grid = InProcessGrid(app, self.site_config, self.run_config)
        self.delivered: list[tuple[str, int]] = []
        self.grid.on_instruction = self._record

    def _record(self, message: Message) -> Message:
        self.delivered.append((message.metadata.message_type, message.metadata.dst_node_id))
        return message

    def _train(self, msg: Message, context) -> Message:
        node = msg.metadata.dst_node_id
        report = ConfigRecord({"epsilon": 1.5 + node, "delta": 1e-5})
        if node in self.refusing:
            refusal = Refusal(BUDGET_EXHAUSTED, "the next round would pass dp-max-epsilon")
            return Message(PrivacyRefusal(refusal, report).content(), reply_to=msg)
        payload, params, _ = DenseCodec().encode(self.updates[node], None)
        metrics = MetricRecord({wire.NUM_EXAMPLES: self.examples[node], "train-loss": 0.25,
                                "train-accuracy": 0.5})
        return Message(RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                                   wire.METRICS_KEY: metrics, wire.PRIVACY_KEY: report}),
                       reply_to=msg)

    def run_round(self, server_round=1, user_dp=False):
        zeros = OrderedDict((k, np.zeros(s, np.float32)) for k, s in self.shapes.items())
        config = ConfigRecord({"server-round": server_round})
        messages = [Message(RecordDict({wire.ARRAYS_KEY: wire.arrays_to_record(zeros),
                                        wire.CONFIG_KEY: config}), node, "train")
                    for node in self.nodes]
        return SecureAggregation(self.grid, self.config, train_timeout=60,
                                 user_dp=user_dp).run(messages, self.dim)

    def expected_mean(self, contributors, uniform=False):
        cap = self.config.secagg_max_examples
        flat = {n: np.concatenate([u.ravel() for u in self.updates[n].values()])
                for n in contributors}
        weights = {n: 1.0 if uniform else min(self.examples[n], cap) / cap for n in contributors}
        return sum(weights[n] * flat[n] for n in contributors) / sum(weights.values()), \
            sum(weights.values())

    def assert_mean_of(self, result, contributors):
        assert result.aborted is None, result.aborted
        assert result.contributors == sorted(contributors)
        expected, total_weight = self.expected_mean(contributors)
        step = FixedPoint(self.config.secagg_clip, self.config.secagg_value_bits, 1).step
        # each contributor's stochastic rounding moves the weighted sum by < 1 step
        assert np.abs(result.mean_update - expected).max() < len(contributors) * step / total_weight
        assert result.totals["examples"] == sum(self.examples[n] for n in contributors)


def drop_at(fed: Federation5, stage: str, nodes: set[int]):
    """Lose the replies of ``nodes`` to ``stage`` (as if they went offline)."""
    def hook(reply: Message):
        if reply.metadata.message_type == message_type(stage) and \
                reply.metadata.src_node_id in nodes:
            return None
        return reply
    fed.grid.on_reply = hook


def test_unmasked_sum_equals_plaintext_weighted_sum_and_secrets_are_erased():
    fed = Federation5()
    result = fed.run_round()
    fed.assert_mean_of(result, fed.nodes)
    assert result.threshold == 4 and result.neighbours == 5
    assert result.totals["train-loss"] == pytest.approx(0.25, abs=1e-6)
    assert not result.failed and not result.rejected and not result.timed_out
    # the only upload that grows with the model is the b-bit packed vector
    packed = -(-fed.dim // 8) * result.sum_bits
    assert all(packed < up < packed + 3000 for up in result.bytes_up.values())
    for context in fed.grid.contexts.values():
        state = context.state[STATE_KEY]
        assert state["stage"] == UNMASK
        assert not {"seed", "mask-private", "envelope-private", "seed-shares",
                    "key-shares"} & set(state.keys())
        assert list(context.state.keys()) == [STATE_KEY]  # no update kept between messages


def test_a_masked_upload_is_indistinguishable_from_uniform():
    fed = Federation5(nodes=(1, 2, 3), shapes={"w": (256, 200)})  # ~200 values per bin
    captured = {}

    def capture(reply):
        if reply.metadata.message_type == message_type(MASKED_INPUT):
            captured[reply.metadata.src_node_id] = reply.content[MASKED_KEY]["values"].numpy()
        return reply
    for node in fed.nodes:  # a very non-uniform input: every coordinate the same
        fed.updates[node] = OrderedDict(w=np.full((256, 200), 0.004, np.float32))
    fed.grid.on_reply = capture
    result = fed.run_round()
    assert result.aborted is None
    bits = result.sum_bits
    masked = unpack(captured[2], bits, fed.dim).astype(np.int64)
    fixed = FixedPoint(fed.config.secagg_clip, fed.config.secagg_value_bits, bits)
    plain, _ = fixed.encode(np.full(fed.dim, 0.004, np.float32), 1.0, np.random.default_rng(0))
    plain = plain.astype(np.int64) & ((1 << bits) - 1)
    for values, uniform in ((masked, True), (plain, False)):
        for chunk in (values & 0xFF, values >> (bits - 8)):  # low and high 8-bit chunks
            observed = np.bincount(chunk, minlength=256)
            p_value = stats.chisquare(observed).pvalue
            assert (p_value > 1e-4) if uniform else (p_value < 1e-12)


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_up_to_n_minus_t_at_every_stage_still_give_the_sum(stage):
    fed = Federation5()
    gone = {202, 404}  # n - t = 2
    drop_at(fed, stage, gone)
    result = fed.run_round()
    # dropping after the masked input arrived: those inputs still count
    contributors = fed.nodes if stage in (CONSISTENCY, UNMASK) \
        else [n for n in fed.nodes if n not in gone]
    fed.assert_mean_of(result, contributors)
    assert set(result.timed_out) == gone and set(result.timed_out.values()) == {stage}


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_at_any_stage_aborts_and_reveals_nothing(stage, caplog):
    fed = Federation5()
    drop_at(fed, stage, {202, 303, 404})  # n - t + 1 = 3
    with caplog.at_level(logging.WARNING, logger="sepal.server"):
        result = fed.run_round()
    assert result.mean_update is None and result.contributors == []
    assert "threshold" in result.aborted
    assert "abandoned" in caplog.text
    unmask_requests = [n for kind, n in fed.delivered if kind == message_type(UNMASK)]
    if stage != UNMASK:  # no client was even asked for a share to unmask
        assert unmask_requests == []
    else:  # two of the three needed seed shares per survivor: no self mask can be removed
        assert "share(s)" in result.aborted


def test_tampered_share_envelope_is_reported_and_its_sender_still_counts(caplog):
    fed = Federation5()

    def tamper(message):
        if message.metadata.message_type == message_type(MASKED_INPUT) and \
                message.metadata.dst_node_id == 505:
            shares = message.content[SHARES_KEY]
            envelopes = list(shares["envelopes"])
            at = list(shares["senders"]).index(303)
            envelopes[at] = envelopes[at][:-1] + bytes([envelopes[at][-1] ^ 0x40])
            shares["envelopes"] = envelopes
        return message
    fed.grid.on_instruction = tamper
    with caplog.at_level(logging.WARNING):
        result = fed.run_round()
    # 505 lacks one share of 303's secrets; the other holders rebuild them
    fed.assert_mean_of(result, fed.nodes)
    assert result.accusations == {303: [505]} and not result.rejected
    assert "envelope from node 303 rejected" in caplog.text
    assert "could not open the share envelope of node 303" in caplog.text


def test_wrong_length_masked_vector_drops_its_sender_and_the_sum_is_right():
    fed = Federation5()

    def truncate(reply):
        if reply.metadata.message_type == message_type(MASKED_INPUT) and \
                reply.metadata.src_node_id == 404:
            record = reply.content[MASKED_KEY]
            record["values"] = type(record["values"])(record["values"].numpy()[:-3].copy())
        return reply
    fed.grid.on_reply = truncate
    result = fed.run_round()
    fed.assert_mean_of(result, [101, 202, 303, 505, 606])
    assert "expected" in result.rejected[404] and "uint8" in result.rejected[404]


def test_reply_replayed_from_an_earlier_round_is_detected_and_dropped():
    fed = Federation5()
    old = {}

    def keep(reply):
        if reply.metadata.message_type == message_type(MASKED_INPUT):
            old[reply.metadata.src_node_id] = reply
        return reply
    fed.grid.on_reply = keep
    fed.run_round(server_round=1)

    def replay(reply):
        if reply.metadata.message_type == message_type(MASKED_INPUT) and \
                reply.metadata.src_node_id == 202:
            return Message(content=old[202].content, reply_to=Message(
                RecordDict(), 202, reply.metadata.message_type))
        return reply
    fed.grid.on_reply = replay
    result = fed.run_round(server_round=2)
    fed.assert_mean_of(result, [101, 303, 404, 505, 606])
    assert "replayed" in result.rejected[202] and "round 1" in result.rejected[202]


def test_client_refuses_a_replayed_instruction_and_a_second_unmask():
    fed = Federation5(nodes=(1, 2, 3))
    seen = {}

    def keep(message):
        seen.setdefault(message.metadata.message_type, {})[message.metadata.dst_node_id] = message
        return message
    fed.grid.on_instruction = keep
    fed.run_round(server_round=1)
    fed.grid.on_instruction = None

    # an unmask request replayed after the round: the secrets are gone, the client refuses
    again = fed.grid.send_and_receive([seen[message_type(UNMASK)][1]])[0]
    assert again.has_error() and "stage 'unmask'" in again.error.reason

    # a share-keys message of round 1 delivered in round 2 is refused by its round id
    def replay_old(message):
        if message.metadata.message_type == message_type(SHARE_KEYS) and \
                message.metadata.dst_node_id == 3:
            old = seen[message_type(SHARE_KEYS)][3]
            return Message(old.content, 3, old.metadata.message_type)
        return message
    fed.grid.on_instruction = replay_old
    result = fed.run_round(server_round=2)
    assert "replayed or misrouted" in result.failed[3]
    fed.assert_mean_of(result, [1, 2])  # t = 2 of 3: the other two still aggregate
    assert STATE_KEY not in fed.grid.contexts[3].state  # the refusing node forgot round 2


def test_sparse_k_regular_graph_with_dropouts_gives_the_sum():
    nodes = tuple(range(1, 21))
    fed = Federation5(nodes=nodes, **{"secagg-neighbours": 10})
    drop_at(fed, MASKED_INPUT, {4, 9})
    result = fed.run_round()
    assert result.neighbours == 10 and result.threshold == 8  # ceil(2/3 x 11)
    fed.assert_mean_of(result, [n for n in nodes if n not in (4, 9)])
    setup_uploads = {n for kind, n in fed.delivered if kind == message_type(SHARE_KEYS)}
    assert setup_uploads == set(nodes)


def test_privacy_reports_are_forwarded_and_a_refusing_site_counts_as_dropped():
    fed = Federation5()
    fed.refusing = {303}
    result = fed.run_round()
    fed.assert_mean_of(result, [101, 202, 404, 505, 606])
    assert result.refused[303].code == BUDGET_EXHAUSTED
    assert {n: float(r["epsilon"]) for n, r in result.privacy.items()} == \
        {n: 1.5 + n for n in fed.nodes}


def test_user_level_dp_noise_goes_on_the_unweighted_secure_mean():
    fed = Federation5(**{"user-dp": "client-fixed", "user-dp-noise-multiplier": 1e-4,
                         "user-dp-clipping-norm": 1.0})
    cfg = RunConfig(min_train_nodes=2, min_available_nodes=6, round_timeout=60)
    strategy = wrap_with_user_level_dp(
        FedAvg(min_available_nodes=6, min_train_nodes=6),
        UserLevelDPConfig.from_mapping(fed.run_config), fed.grid, cfg)
    federation = SecureFederation(fed.grid, strategy, cfg, ["negative", "positive"], None, None,
                                  train_config={"upload-codec": "dense"}, secagg=fed.config,
                                  user_dp=True)
    weights = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    messages = list(strategy.configure_train(
        1, wire.arrays_to_record(weights), ConfigRecord({"server-round": 1}), fed.grid))
    decoded = federation.collect_updates(messages, weights)
    arrays, _ = strategy.aggregate_train(1, decoded.accepted)
    assert arrays is not None  # Flower's wrapper counted 6 replies for 6 sampled clients
    new = np.concatenate([arrays[k].numpy().ravel() for k in SHAPES])
    mean, _ = fed.expected_mean(fed.nodes, uniform=True)
    weighted, _ = fed.expected_mean(fed.nodes)
    noise_and_rounding = 1e-4 * 1.0 / 6 * 6 + 6 * fed.config.secagg_clip / 32767 / 6
    assert np.abs(new - mean).max() < noise_and_rounding < np.abs(new - weighted).max()
    assert strategy.privacy_spent().epsilon > 0


@pytest.mark.parametrize("strategy_class", [FedAvg, FedAdam])
def test_strategy_aggregates_the_one_secure_reply_as_the_weighted_mean(strategy_class):
    fed = Federation5()
    weights = OrderedDict((k, np.full(s, 0.5, np.float32)) for k, s in SHAPES.items())
    strategy = strategy_class(min_available_nodes=6, min_train_nodes=6)
    cfg = RunConfig(min_train_nodes=2, min_available_nodes=6, round_timeout=60)
    federation = SecureFederation(fed.grid, strategy, cfg, ["negative", "positive"], None, None,
                                  train_config={"upload-codec": "dense"}, secagg=fed.config)
    messages = list(strategy.configure_train(
        1, wire.arrays_to_record(weights), ConfigRecord({"server-round": 1}), fed.grid))
    decoded = federation.collect_updates(messages, weights)
    assert decoded.clients == 6 and len(decoded.accepted) == 1
    assert decoded.summary["secagg"]["aborted"] is None
    assert set(decoded.bytes_up) == set(fed.nodes)

    arrays, metrics = strategy.aggregate_train(1, decoded.accepted)
    new = np.concatenate([arrays[k].numpy().ravel() for k in SHAPES])
    old = np.concatenate([weights[k].ravel() for k in SHAPES])
    mean, _ = fed.expected_mean(fed.nodes)
    reply_metrics = decoded.accepted[0].content[wire.METRICS_KEY]
    assert reply_metrics[wire.NUM_EXAMPLES] == sum(fed.examples.values())
    assert metrics["train-loss"] == pytest.approx(0.25, abs=1e-6)
    if strategy_class is FedAvg:
        assert np.allclose(new, old + mean, atol=1e-4)
    else:  # Adam's first step moves every clearly non-zero coordinate along the mean update
        clear = np.abs(mean) > 1e-3
        assert np.array_equal(np.sign(new - old)[clear], np.sign(mean)[clear])
