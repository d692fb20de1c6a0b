"""Streaming aggregation gives the strategy the model the collect-everything path gives it,
with the same accounting, and holds memory that does not grow with the number of sites.

Tolerance of "the same model": the streaming path sums in float64 and rounds once, Flower's
FedAvg sums float32 products reply by reply, so the two differ by float32 summation order:
max |streaming - full| <= 1e-6 x max |model| (a few float32 ulps at the model's scale).
"""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from sepal import wire
from sepal.codecs import build_codec
from sepal.config import RunConfig
from sepal.privacy import UserLevelDPConfig
from sepal.privacy.refusal import BUDGET_EXHAUSTED, PrivacyRefusal, Refusal
from sepal.settings import Settings
from server.central_dp import UserLevelDP
from server import federation as federation_module
from server.federation import Federation
from server.streaming import StreamingRound
from server.uploads import decode_replies
from sepal.validation_config import ValidationConfig
from server.validation import UpdateValidator
from strategies import strategy_traits
from strategies.compatibility import active_wrappers, aggregates_by_weighted_mean


def wrappers_of(run_config: dict) -> list:
    return active_wrappers(Settings.from_mapping(run_config))

GLOBAL = OrderedDict([("encoder.weight", np.full((64, 32), 0.05, np.float32)),
                      ("encoder.bias", np.linspace(-1, 1, 32, dtype=np.float32)),
                      ("classifier.weight", np.full((2, 32), -0.3, np.float32))])
NODES = [7_000_000 + 1_009 * k for k in range(6)]
TOLERANCE = 1e-6  # relative to the model's largest magnitude


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def update_for(node: int, scale: float = 0.01) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return OrderedDict((k, (scale * rng.standard_normal(v.shape)).astype(np.float32))
                       for k, v in GLOBAL.items())


def upload(node: int, chain: str = "dense", scale: float = 0.01, **metrics) -> RecordDict:
    payload, params, _ = build_codec(chain, np.random.default_rng(node)).encode(
        update_for(node, scale), None)
    return RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                       wire.METRICS_KEY: MetricRecord({
                           wire.NUM_EXAMPLES: 10 + node % 97, "train-loss": 0.1 * (node % 7),
                           "train-accuracy": 0.5, **metrics})})


class ReplayGrid(Grid):
    """Answers each instruction with ``answer(node)`` (content, an Error, or None for a node
    that never answers); replies become available in reverse node order."""

    pull_interval = 0.01

    def __init__(self, answer: Callable[[int], RecordDict | Error | None]):
        self.answer = answer
        self.waiting: dict[str, Message] = {}

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        ids = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"instruction-{number}"
            ids.append(message.metadata.message_id)
            answer = self.answer(message.metadata.dst_node_id)
            if answer is not None:
                self.waiting[message.metadata.message_id] = Message(answer, reply_to=message)
        return ids

    def pull_messages(self, message_ids):
        ready = sorted((i for i in message_ids if i in self.waiting), reverse=True)
        return [self.waiting.pop(i) for i in ready]

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.pull_messages(self.push_messages(messages)))

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run):
        raise NotImplementedError


def aggregate(strategy_factory, streaming: bool, answer, validator_cfg=None,
              held_aside: int = 1):
    """One round's collect + strategy aggregate; the decoded round and the new model."""
    np.random.seed(0)  # Flower's DP wrappers draw their noise from numpy's global generator
    strategy = strategy_factory()
    grid = ReplayGrid(answer)
    federation = Federation(grid, strategy, RunConfig(min_train_nodes=2, round_timeout=0.3),
                            ["negative", "positive"], None, None,
                            validator=UpdateValidator(validator_cfg), streaming=streaming)
    federation.held_aside = held_aside
    messages = list(strategy.configure_train(1, wire.arrays_to_record(GLOBAL),
                                             ConfigRecord({}), grid))
    decoded = federation.collect_updates(messages, GLOBAL)
    model, metrics, refused = federation._aggregate(1, decoded, GLOBAL)
    assert not refused
    return decoded, model, metrics


def fedavg():
    return FedAvg(min_available_nodes=len(NODES), min_train_nodes=2)


def fedadam():
    return FedAdam(min_available_nodes=len(NODES), min_train_nodes=2, eta=1e-3)


def fedprox():
    return FedProx(min_available_nodes=len(NODES), min_train_nodes=2, proximal_mu=1.0)


def user_level_dp():
    settings = UserLevelDPConfig(user_dp="client-fixed", user_dp_noise_multiplier=0.5,
                                   user_dp_clipping_norm=10.0, user_dp_delta=1e-3)
    return UserLevelDP(fedavg(), settings, num_sampled_clients=len(NODES),
                       population=len(NODES))


def assert_same_model(left, right):
    scale = max(float(np.abs(a).max()) for a in left.values())
    assert list(left) == list(right)
    for name in left:
        assert left[name].dtype == right[name].dtype == GLOBAL[name].dtype
        assert float(np.abs(left[name] - right[name]).max()) <= TOLERANCE * scale, name


@pytest.mark.parametrize("strategy_factory", [fedavg, fedadam, fedprox, user_level_dp])
@pytest.mark.parametrize("chain", ["dense", "q8", "topk:0.25,q4"])
def test_streaming_and_collecting_every_update_give_the_same_model(strategy_factory, chain):
    # Flower's accounted DP wrapper aggregates only when every sampled client answers
    failing = None if strategy_factory is user_level_dp else NODES[4]
    answering = len(NODES) - (failing is not None)

    def answer(node):
        if node == failing:
            return Error(code=0, reason="out of memory")
        return upload(node, chain)

    full, full_model, full_metrics = aggregate(strategy_factory, False, answer)
    stream, stream_model, stream_metrics = aggregate(strategy_factory, True, answer)

    assert len(full.accepted) == answering and len(stream.accepted) == 1
    assert full.clients == stream.clients == answering
    assert_same_model(full_model, stream_model)
    assert not np.allclose(stream_model["encoder.weight"], GLOBAL["encoder.weight"])
    for key in ("train-loss", "train-accuracy"):
        assert stream_metrics[key] == pytest.approx(full_metrics[key], rel=1e-9)
    assert (stream.bytes_up, stream.failed, stream.rejected, stream.timed_out) == \
        (full.bytes_up, full.failed, full.rejected, full.timed_out)
    assert stream.client_metrics == full.accepted[0].content[wire.METRICS_KEY]


def test_accounting_matches_for_rejected_refused_silent_and_failed_clients():
    silent, failing, broken, refusing = NODES[1], NODES[2], NODES[3], NODES[5]

    def answer(node):
        if node == silent:
            return None
        if node == failing:
            return Error(code=0, reason="ClientApp raised")
        if node == broken:
            content = upload(node)
            content[wire.METRICS_KEY] = MetricRecord({wire.NUM_EXAMPLES: -3})
            return content
        if node == refusing:
            return PrivacyRefusal(Refusal(BUDGET_EXHAUSTED, "ε would pass 8"),
                                  ConfigRecord({"epsilon": 7.9, "delta": 1e-5})).content()
        content = upload(node)
        content[wire.PRIVACY_KEY] = ConfigRecord({"epsilon": 1.0 + node % 5, "delta": 1e-5})
        return content

    full, full_model, _ = aggregate(fedavg, False, answer)
    stream, stream_model, _ = aggregate(fedavg, True, answer)

    assert full.timed_out == stream.timed_out == [silent]
    assert list(full.failed) == list(stream.failed) == [failing]
    assert full.rejected == stream.rejected and list(stream.rejected) == [broken]
    assert full.refused == stream.refused and list(stream.refused) == [refusing]
    assert full.privacy == stream.privacy and len(stream.privacy) == 3  # not the rejected one
    assert full.bytes_up == stream.bytes_up
    assert stream.clients == full.clients
    assert_same_model(full_model, stream_model)


@pytest.mark.parametrize("outlier", [0, 2, 5])
def test_one_out_of_bounds_update_is_rejected_wherever_it_arrives(outlier):
    def answer(node):
        return upload(node, scale=1.0 if node == NODES[outlier] else 0.01)

    full, full_model, _ = aggregate(fedavg, False, answer)
    stream, stream_model, _ = aggregate(fedavg, True, answer)

    assert list(stream.rejected) == list(full.rejected) == [NODES[outlier]]
    assert stream.rejected == full.rejected
    assert stream.clients == full.clients == 5
    assert_same_model(full_model, stream_model)


def test_more_out_of_bounds_updates_than_held_aside_refuse_the_aggregate():
    outliers = {NODES[1], NODES[4]}
    validator = UpdateValidator()
    stream = StreamingRound(GLOBAL, validator, {})
    for node in NODES:
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        instruction.metadata.__dict__["_message_id"] = f"instruction-{node}"
        stream.add(Message(upload(node, scale=1.0 if node in outliers else 0.01),
                           reply_to=instruction))
    decoded = stream.finish(wire.ARRAYS_KEY, [instruction])

    assert set(decoded.rejected) == outliers
    assert decoded.accepted == [] and "already in the sum" in decoded.aggregate_refused


def test_as_many_out_of_bounds_updates_as_held_aside_are_rejected_without_loss():
    outliers = {NODES[1], NODES[4]}

    def answer(node):
        return upload(node, scale=1.0 if node in outliers else 0.01)

    full, full_model, _ = aggregate(fedavg, False, answer)
    stream, stream_model, _ = aggregate(fedavg, True, answer, held_aside=2)

    assert set(stream.rejected) == set(full.rejected) == outliers
    assert not stream.aggregate_refused and stream.clients == full.clients == len(NODES) - 2
    assert_same_model(full_model, stream_model)


def test_a_fixed_norm_limit_rejects_each_update_as_it_arrives():
    config = ValidationConfig(validation_clip_bound=0.05, validation_norm_multiple=1.0)

    def answer(node):
        return upload(node, scale=0.01 if node % 2 else 0.0001)

    full, full_model, _ = aggregate(fedavg, False, answer, config)
    stream, stream_model, _ = aggregate(fedavg, True, answer, config)

    assert stream.rejected == full.rejected
    assert set(stream.rejected) == {n for n in NODES if n % 2}
    assert_same_model(full_model, stream_model)


def test_the_weighted_mean_family_streams_and_robust_strategies_collect_every_update():
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert aggregates_by_weighted_mean(strategy_traits(name), wrappers_of({}))
    assert aggregates_by_weighted_mean(strategy_traits("fedavg"),
                                       wrappers_of({"user-dp": "client-fixed"}))
    for name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        assert not aggregates_by_weighted_mean(strategy_traits(name), wrappers_of({}))
    assert not aggregates_by_weighted_mean(strategy_traits("fedavg"),
                                           wrappers_of({"user-dp": "server-fixed"}))


def _peak_bytes(sites: int, streaming: bool) -> int:
    """tracemalloc's peak while ``sites`` uploads of a 1 MiB model are read and aggregated
    (each upload built just before it is read, as if it had just arrived)."""
    model = OrderedDict([("w", np.zeros(1 << 18, np.float32))])
    codec = build_codec("dense")

    def arriving():
        for node in range(1, sites + 1):
            instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
            instruction.metadata.__dict__["_message_id"] = f"instruction-{node}"
            update = OrderedDict(w=np.full(1 << 18, 1e-3 * node, np.float32))
            payload, params, _ = codec.encode(update, None)
            content = RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                                  wire.METRICS_KEY: MetricRecord({wire.NUM_EXAMPLES: 10})})
            yield Message(content, reply_to=instruction)

    tracemalloc.start()
    try:
        if streaming:
            stream = StreamingRound(model, UpdateValidator(), {})
            for reply in arriving():
                stream.add(reply)
                del reply
            decoded = stream.finish(wire.ARRAYS_KEY, [Message(RecordDict(), dst_node_id=1,
                                                              message_type="train")])
        else:
            decoded = decode_replies(list(arriving()), model)
        FedAvg().aggregate_train(1, decoded.accepted)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_the_number_of_sites():
    model_bytes = 1 << 20
    few, many = _peak_bytes(4, streaming=True), _peak_bytes(32, streaming=True)
    assert many - few < model_bytes / 2, (few, many)
    # the collect-everything path holds every upload: the measure sees the growth
    assert _peak_bytes(32, streaming=False) - _peak_bytes(4, streaming=False) > 20 * model_bytes


class _Unevaluated(Federation):
    """The round loop without the server-side test-set evaluation (no model here)."""

    def _evaluate(self, weights):
        return {"accuracy": float("nan")}


class _Records:
    """Keeps the round records (no files, plots or TensorBoard)."""

    def __init__(self):
        self.rounds: list[dict] = []

    def record_round(self, record: dict) -> None:
        self.rounds.append(record)


OUTLIERS = {NODES[0], NODES[3]}


def two_rounds_with_two_outliers() -> tuple[Federation, dict, dict]:
    """Two streaming rounds in which the same two sites send oversized updates; the
    federation and the round records."""
    grid = ReplayGrid(lambda node: upload(node, scale=1.0 if node in OUTLIERS else 0.01))
    federation = _Unevaluated(grid, fedavg(), RunConfig(min_train_nodes=2, round_timeout=5),
                              ["negative", "positive"], None, _Records(), streaming=True)
    first = federation.run_round(1, GLOBAL, started=0.0)
    assert all(np.array_equal(first[k], GLOBAL[k]) for k in GLOBAL)  # round 1 refused
    second = federation.run_round(2, first, started=0.0)
    assert not np.allclose(second["encoder.weight"], GLOBAL["encoder.weight"])
    refused, later = federation.output.rounds
    assert "already in the sum" in refused["aggregate_refused"]
    assert set(refused["rejected_reasons"]) == {str(n) for n in OUTLIERS}
    assert "aggregate_refused" not in later and later["clients"] == len(NODES) - 2
    assert set(later["rejected_reasons"]) == {str(n) for n in OUTLIERS}
    return federation, refused, later


def test_a_refused_streaming_round_keeps_the_model_and_later_rounds_hold_more_aside():
    federation, _, _ = two_rounds_with_two_outliers()
    assert federation.streaming and federation.held_aside == 2


def test_beyond_the_most_held_aside_later_rounds_collect_every_update(monkeypatch):
    monkeypatch.setattr(federation_module, "MAX_HELD_ASIDE", 1)
    federation, _, _ = two_rounds_with_two_outliers()
    assert not federation.streaming
