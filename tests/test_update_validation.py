"""Every kind of invalid update is rejected, named, counted; the round goes on without it."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from sepal import wire
from sepal.codecs import DenseCodec
from sepal.config import ConfigError
from server.checkpoint import read_checkpoint
from server.uploads import decode_replies
from sepal.validation_config import ValidationConfig
from server.validation import UpdateValidator
from testing.attacks import not_a_number, poisoned, scaled
from tests.conftest import read_metrics
from tests.inprocess_grid import run_inprocess

GLOBAL = OrderedDict([("encoder.weight", np.ones((4, 3), np.float32)),
                      ("classifier.bias", np.zeros(2, np.float32))])


def _reply(node: int, update: dict[str, np.ndarray], examples=10) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"instruction-{node}"
    payload, codec, _ = DenseCodec().encode(OrderedDict(update), None)
    content = RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: codec,
                          wire.METRICS_KEY: MetricRecord({wire.NUM_EXAMPLES: examples})})
    return Message(content, reply_to=instruction)


def _honest(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}


def _replace_tensor(reply: Message, name: str, value: np.ndarray) -> Message:
    arrays = OrderedDict((k, a) for k, a in reply.content[wire.UPDATE_KEY].items())
    arrays[name] = Array(value)
    reply.content[wire.UPDATE_KEY] = ArrayRecord(arrays)
    return reply


def _drop_tensor(reply: Message) -> Message:
    arrays = OrderedDict((k, a) for k, a in reply.content[wire.UPDATE_KEY].items()
                         if k != "classifier.bias")
    reply.content[wire.UPDATE_KEY] = ArrayRecord(arrays)
    return reply


def _drop_record(reply: Message, key: str) -> Message:
    del reply.content[key]
    return reply


def _nan(seed):
    update = _honest(seed)
    update["encoder.weight"][1, 2] = np.nan
    return update


DEFECTS = {
    "missing tensor": (lambda r: _drop_tensor(r), "missing from the upload"),
    "unknown tensor": (lambda r: _replace_tensor(r, "pooler.weight", np.zeros(3, np.float32)),
                       "not in the model"),
    "wrong shape": (lambda r: _replace_tensor(r, "classifier.bias", np.zeros(3, np.float32)),
                    "shape (3,)"),
    "wrong dtype": (lambda r: _replace_tensor(r, "classifier.bias", np.zeros(2, np.float64)),
                    "dtype float64"),
    "NaN": (lambda r: _reply(r.metadata.src_node_id, _nan(9)), "NaN or Inf"),
    "Inf": (lambda r: _replace_tensor(r, "classifier.bias",
                                      np.array([np.inf, 0], np.float32)), "NaN or Inf"),
    "huge norm": (lambda r: _reply(r.metadata.src_node_id,
                                   {k: 1000 * v for k, v in _honest(9).items()}),
                  "exceeds 10 x the round's median norm"),
    "no example count": (lambda r: _reply(r.metadata.src_node_id, _honest(9), examples=0),
                         "'num-examples' must be a positive integer"),
    "no update record": (lambda r: _drop_record(r, wire.UPDATE_KEY), "record 'update' missing"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_defective_upload_is_rejected_naming_client_and_defect(defect, caplog):
    tamper, expected = DEFECTS[defect]
    replies = [_reply(node, _honest(node)) for node in (11, 12, 13)]
    replies.append(tamper(_reply(14, _honest(14))))

    decoded = decode_replies(replies, GLOBAL)

    assert list(decoded.rejected) == [14] and expected in decoded.rejected[14]
    assert [m.metadata.src_node_id for m in decoded.accepted] == [11, 12, 13]
    assert any("client 14" in r.message and expected in r.message for r in caplog.records)


def test_accepted_replies_are_global_plus_update_in_node_order():
    updates = {node: _honest(node) for node in (30, 10, 20)}
    decoded = decode_replies([_reply(n, u) for n, u in updates.items()], GLOBAL)
    assert [m.metadata.src_node_id for m in decoded.accepted] == [10, 20, 30]
    for message in decoded.accepted:
        arrays = wire.record_to_arrays(message.content[wire.ARRAYS_KEY])
        update = updates[message.metadata.src_node_id]
        assert all(np.array_equal(arrays[k], GLOBAL[k] + update[k]) for k in GLOBAL)


def test_validator_checks_names_shapes_dtype_and_values_whatever_the_codec():
    validator = UpdateValidator()
    good = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    validator.check(good, GLOBAL)
    cases = [
        ({"encoder.weight": good["encoder.weight"]}, "missing from the update"),
        ({**good, "extra": np.zeros(1, np.float32)}, "not in the global model"),
        ({**good, "classifier.bias": np.zeros((2, 1), np.float32)}, "shape (2, 1)"),
        ({**good, "classifier.bias": np.zeros(2, np.float16)}, "dtype float16"),
        ({**good, "classifier.bias": np.array([np.nan, -np.inf], np.float32)}, "2 NaN or Inf"),
    ]
    for update, expected in cases:
        with pytest.raises(wire.UploadError) as raised:
            validator.check(update, GLOBAL)
        assert expected in str(raised.value)


def test_norm_bound_uses_the_clip_bound_when_given_else_the_median_of_three_or_more():
    scaled = {k: 5 * np.ones_like(v) for k, v in GLOBAL.items()}  # norm 5 * sqrt(14)
    small = {k: 0.1 * np.ones_like(v) for k, v in GLOBAL.items()}
    clip = UpdateValidator(ValidationConfig(validation_norm_multiple=2, validation_clip_bound=1))
    assert set(clip.check_norms({1: scaled, 2: small})) == {1}
    assert "2 x the clip bound 1" in clip.check_norms({1: scaled})[1]
    median = UpdateValidator(ValidationConfig(validation_norm_multiple=10))
    assert median.check_norms({1: scaled, 2: small}) == {}  # two: no outlier to single out
    assert set(median.check_norms({1: scaled, 2: small, 3: small})) == {1}
    off = UpdateValidator(ValidationConfig(validation_norm_multiple=0))
    assert off.check_norms({1: scaled, 2: small, 3: small}) == {}
    with pytest.raises(ConfigError, match="validation-norm-multiple"):
        ValidationConfig.from_mapping({"validation-norm-multiple": 0.5})


def test_round_goes_on_without_bad_clients_and_repeat_offenders_are_counted(tmp_path, sst2):
    # partition 2 uploads NaN, partition 3 a boosted update
    folder, grid = run_inprocess(tmp_path, {}, num_nodes=4, tamper={
        2: poisoned(not_a_number), 3: poisoned(scaled(1000.0))})

    nan_node, boosted_node = str(grid.node_of(2)), str(grid.node_of(3))
    rounds = read_metrics(folder)[1:]
    assert [r["clients"] for r in rounds] == [2, 2] and [r["rejected"] for r in rounds] == [2, 2]
    assert all("skipped" not in r for r in rounds)
    for record in rounds:
        assert "NaN or Inf" in record["rejected_reasons"][nan_node]
        assert "median norm" in record["rejected_reasons"][boosted_node]
    assert rounds[0]["offenders"] == {nan_node: 1, boosted_node: 1}
    assert rounds[1]["offenders"] == {nan_node: 2, boosted_node: 2}
    saved = read_checkpoint(folder / "checkpoints" / "round-0002.ckpt")
    assert saved.validator == {"offences": {nan_node: 2, boosted_node: 2}}


def test_norm_is_the_float64_norm_and_out_of_range_values_are_flagged():
    from server.validation import value_summary

    rng = np.random.default_rng(3)
    update = {"a": (0.01 * rng.standard_normal(300_001)).astype(np.float32),
              "b": np.full(5, 1e19, np.float32)}  # squares overflow float32, not float64
    exact = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in update.values()))
    within, norm = value_summary(update)
    assert within and norm == pytest.approx(exact, rel=1e-7)
    for bad in (np.nan, np.inf, -4e19):
        update["a"][123] = bad
        assert not value_summary(update)[0]
