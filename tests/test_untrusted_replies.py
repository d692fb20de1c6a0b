"""Replies crafted to crash, exhaust or take over a round: each one is rejected alone,
named in the round's reasons, and the honest replies still aggregate."""

from __future__ import annotations

import logging
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp.strategy import FedAvg

from sepal import wire
from sepal.codecs.varint import encode_varints
from server.federation import Federation
from server.uploads import decode_replies
from sepal.validation_config import ValidationConfig
from server.validation import UpdateValidator
from tests.fuzz_replies import GLOBAL, MODEL_BYTES, as_reply, npy_claiming, reply_content

ATTACKER = 3
HONEST = (1, 2)
FIRST = next(iter(GLOBAL))


def _set_param(chain, key, value):
    content = reply_content(ATTACKER, chain)
    content[wire.CODEC_KEY][key] = value
    return content


def _swap(key, record):
    content = reply_content(ATTACKER, "dense")
    content[key] = record
    return content


def _privacy(**fields):
    content = reply_content(ATTACKER, "dense")
    content[wire.PRIVACY_KEY] = ConfigRecord(fields)
    return content


def _huge_header():
    content = reply_content(ATTACKER, "dense")
    content[wire.UPDATE_KEY][FIRST] = Array(
        dtype="float32", shape=(4,), stype=SType.NUMPY,
        data=npy_claiming((10**12,), "float32", b"\0" * 16))
    return content


def _long_index_stream():
    """More varint bytes than the declared counts can need (5 bytes per index at most)."""
    content = reply_content(ATTACKER, "topk:0.05")
    counts = list(content[wire.CODEC_KEY]["counts"])
    stream = encode_varints(np.ones(6 * sum(counts), np.uint64))
    content[wire.UPDATE_KEY]["indices"] = Array(stream)
    return content


def _examples(count):
    content = reply_content(ATTACKER, "dense")
    content[wire.METRICS_KEY][wire.NUM_EXAMPLES] = count
    return content


def _largest_float():
    content = reply_content(ATTACKER, "dense")
    update = wire.read_array(content[wire.UPDATE_KEY][FIRST], FIRST).copy()
    update.flat[0] = np.finfo(np.float32).max
    content[wire.UPDATE_KEY][FIRST] = Array(update)
    return content


CASES = {
    "quantizer block 2^62": (lambda: _set_param("q8", "block", 2**62), "'block' is 4611686"),
    "quantizer block 3e8": (lambda: _set_param("q8", "block", 300_000_000), "'block' is 3000"),
    "privacy report without delta": (lambda: _privacy(epsilon=1.0), "'delta'"),
    "privacy report with NaN epsilon": (lambda: _privacy(epsilon=float("nan"), delta=1e-5),
                                        "'epsilon'"),
    "update as a ConfigRecord": (lambda: _swap(wire.UPDATE_KEY, ConfigRecord({"a": 1})),
                                 "record 'update' is a ConfigRecord"),
    "metrics as a ConfigRecord": (
        lambda: _swap(wire.METRICS_KEY, ConfigRecord({wire.NUM_EXAMPLES: 10})),
        "record 'metrics' is a ConfigRecord"),
    "codec as a MetricRecord": (lambda: _swap(wire.CODEC_KEY, MetricRecord({"x": 1})),
                                "record 'codec' is a MetricRecord"),
    "array header claiming 10^12 elements": (_huge_header, "declares 1000000000000 x float32"),
    "index stream longer than its counts": (_long_index_stream, "the tensor table declares"),
    "num-examples 2^62": (lambda: _examples(2**62), "more than max-site-examples 100000"),
    "num-examples as a float": (lambda: _examples(10.0), "must be a positive integer"),
    "largest finite float32": (_largest_float, "whose square overflows float32"),
}


@pytest.mark.parametrize("case", CASES)
def test_crafted_reply_is_rejected_alone_and_named(case, caplog):
    make, reason = CASES[case]
    content = make()
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="sepal.server"):
            decoded = decode_replies([as_reply(n, reply_content(n, "dense")) for n in HONEST]
                                     + [as_reply(ATTACKER, content)], GLOBAL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(decoded.rejected) == [ATTACKER] and reason in decoded.rejected[ATTACKER], \
        decoded.rejected
    assert [m.metadata.src_node_id for m in decoded.accepted] == list(HONEST)
    assert any(f"client {ATTACKER}" in r.message and reason in r.message
               for r in caplog.records)
    assert peak < 2 * len(HONEST) * 4 * MODEL_BYTES  # the honest replies' cost, no more
    arrays, _ = FedAvg().aggregate_train(1, decoded.accepted)
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


def test_the_example_cap_is_a_setting():
    content = _examples(500)
    capped = UpdateValidator(ValidationConfig(max_site_examples=400))
    decoded = decode_replies([as_reply(ATTACKER, content)], GLOBAL, validator=capped)
    assert "more than max-site-examples 400" in decoded.rejected[ATTACKER]
    assert decode_replies([as_reply(ATTACKER, content)], GLOBAL).accepted


def test_an_extra_metric_in_one_reply_does_not_fail_the_aggregation():
    content = reply_content(ATTACKER, "dense")
    content[wire.METRICS_KEY]["only-here"] = 1.0
    decoded = decode_replies([as_reply(n, reply_content(n, "dense")) for n in HONEST]
                             + [as_reply(ATTACKER, content)], GLOBAL)
    assert len(decoded.accepted) == 3
    _, metrics = FedAvg().aggregate_train(1, decoded.accepted)
    assert "only-here" not in metrics and "train-loss" in metrics


def _federation() -> Federation:
    federation = Federation.__new__(Federation)
    federation.strategy = FedAvg()
    return federation


def _accepted(values: dict[int, float]) -> list[Message]:
    replies = []
    for node, value in values.items():
        arrays = OrderedDict((k, np.full_like(v, value)) for k, v in GLOBAL.items())
        content = RecordDict({wire.ARRAYS_KEY: wire.arrays_to_record(arrays),
                              wire.METRICS_KEY: MetricRecord({wire.NUM_EXAMPLES: 10})})
        replies.append(Message(content=content, metadata=as_reply(node, content).metadata))
    return replies


def test_a_non_finite_aggregate_is_refused_and_the_global_model_kept():
    decoded = decode_replies([], GLOBAL)
    decoded.accepted = _accepted({1: 1.0, 2: np.nan})
    kept, _, refused = _federation()._aggregate(1, decoded, GLOBAL)
    assert "not finite" in refused and kept is GLOBAL
    decoded.accepted = _accepted({1: 1.0, 2: 3.0})
    new, _, refused = _federation()._aggregate(1, decoded, GLOBAL)
    assert refused == "" and all(np.allclose(a, 2.0) for a in new.values())


def test_a_failing_aggregation_ends_the_round_not_the_run():
    decoded = decode_replies([], GLOBAL)
    decoded.accepted = _accepted({1: 1.0})
    decoded.accepted[0].content[wire.METRICS_KEY] = MetricRecord({"no-weight": 1})
    kept, _, refused = _federation()._aggregate(1, decoded, GLOBAL)
    assert "aggregation failed" in refused and kept is GLOBAL


def test_a_largest_float32_update_is_rejected_even_without_a_median_to_compare():
    decoded = decode_replies([as_reply(1, reply_content(1, "dense")),
                              as_reply(ATTACKER, _largest_float())], GLOBAL)
    assert "whose square overflows float32" in decoded.rejected[ATTACKER]
    assert [m.metadata.src_node_id for m in decoded.accepted] == [1]
