"""Codecs on their own: round trips within their stated bounds, the quantizer's
unbiasedness, index coding, chain parsing, and error feedback across rounds."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.serde import context_to_proto

from sepal.codecs import CompressionConfig, build_codec, decode_upload, parse_chain
from sepal.codecs.lossless import available_methods
from sepal.codecs.stochastic_quantization import (
    dequantize,
    num_blocks,
    pack_levels,
    quantize,
    unpack_levels,
)
from sepal.codecs.varint import decode_varints, delta_decode, delta_encode, encode_varints
from sepal.config import ConfigError
from sepal.wire import UploadError

SHAPES = OrderedDict([("embeddings.weight", (500, 16)), ("layer.weight", (64, 48)),
                      ("layer.bias", (48,)), ("classifier.weight", (2, 48))])


def make_update(seed: int = 0, heavy_tail: bool = True) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    draw = rng.standard_t if heavy_tail else (lambda df, size: rng.normal(size=size))
    return OrderedDict((k, (1e-3 * draw(3, size=s)).astype(np.float32))
                       for k, s in SHAPES.items())


def roundtrip(chain: str, update, seed: int = 0):
    payload, params, _ = build_codec(chain, np.random.default_rng(seed)).encode(update, None)
    return decode_upload(payload, params, SHAPES), params


# --- the quantizer on its own -------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizer_is_unbiased_over_many_draws(bits):
    rng = np.random.default_rng(1)
    x = rng.normal(size=300).astype(np.float32)
    draws = 4000
    quantized = quantize(np.tile(x, draws), bits, rng, block=0)
    step = float(quantized.step()[0])
    mean = dequantize(quantized).reshape(draws, x.size).mean(axis=0, dtype=np.float64)
    # each draw is within one step, so the mean's standard error is below step / (2 sqrt(n))
    assert np.abs(mean - x).max() < 5 * step / (2 * np.sqrt(draws))
    # and rounding really is random: a single draw is off by a good part of a step
    assert np.abs(dequantize(quantized)[: x.size] - x).mean() > step / 8


@pytest.mark.parametrize("bits,block", [(2, 0), (4, 256), (8, 64), (12, 100)])
def test_quantizer_error_is_below_one_step_of_each_block(bits, block):
    rng = np.random.default_rng(2)
    x = (rng.standard_t(3, size=5000) * np.repeat([1e-4, 1.0, 1e2], [2000, 2000, 1000])
         ).astype(np.float32)
    quantized = quantize(x, bits, rng, block=block)
    assert quantized.levels.max() <= (1 << bits) - 1
    assert quantized.scales.size == num_blocks(x.size, block)
    step = np.repeat(quantized.step(), block)[: x.size] if block else quantized.step()[0]
    assert (np.abs(dequantize(quantized) - x) <= step * (1 + 1e-5)).all()


def test_quantizer_with_a_shared_scale_puts_every_client_on_one_grid():
    rng = np.random.default_rng(3)
    clients = [rng.uniform(-0.5, 0.5, size=1000).astype(np.float32) for _ in range(5)]
    quantized = [quantize(x, 8, rng, scale=1.0) for x in clients]
    top = 255
    level_sum = sum(q.levels.astype(np.int64) for q in quantized)
    decoded_sum = (2.0 * level_sum / top - len(clients)) * 1.0
    assert np.allclose(decoded_sum, sum(dequantize(q) for q in quantized), atol=1e-5)
    assert np.abs(decoded_sum - sum(clients)).max() <= len(clients) * 2.0 / top
    clipped = quantize(np.array([3.0, -3.0], np.float32), 8, rng, scale=1.0)
    assert dequantize(clipped).tolist() == [1.0, -1.0]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_levels_pack_densely_and_unpack_exactly(bits):
    rng = np.random.default_rng(4)
    levels = rng.integers(0, 1 << bits, size=1001).astype(np.uint8)
    packed = pack_levels(levels, bits)
    assert packed.size == -(-1001 * bits // 8)
    assert np.array_equal(unpack_levels(packed, bits, 1001), levels)
    with pytest.raises(ValueError, match="expected 1001"):
        unpack_levels(packed[:-1], bits, 1001)


# --- sparse indices -----------------------------------------------------------------------

def test_indices_travel_as_varint_gaps_and_come_back_exactly():
    rng = np.random.default_rng(5)
    big = np.sort(rng.choice(2**31, size=1000, replace=False)).astype(np.int64)
    dense_run = np.arange(100, 300)
    sparse = np.array([0, 2**32 - 1], dtype=np.int64)
    stream = delta_encode([big, dense_run, np.zeros(0, np.int64), sparse])
    assert stream.dtype == np.uint8
    assert stream.size < 1000 * 4 + 200 + 10  # far below int64's 8 bytes per index
    decoded = delta_decode(stream, [1000, 200, 0, 2], [2**31, 400, 10, 2**32], list("abcd"))
    for got, want in zip(decoded, [big, dense_run, np.zeros(0), sparse]):
        assert np.array_equal(got, want)
    values = np.array([0, 127, 128, 16383, 16384, 2**35 - 1], dtype=np.uint64)
    assert np.array_equal(decode_varints(encode_varints(values)), values)


def test_bad_index_streams_name_their_defect():
    stream = delta_encode([np.array([3, 3, 5])])
    with pytest.raises(UploadError, match="tensor 'w': duplicate index 3"):
        delta_decode(stream, [3], [10], ["w"])
    with pytest.raises(UploadError, match="tensor 'w': index 12 out of range"):
        delta_decode(delta_encode([np.array([1, 12])]), [2], [10], ["w"])
    with pytest.raises(UploadError, match="truncated"):
        delta_decode(np.array([0x85], np.uint8), [1], [10], ["w"])
    with pytest.raises(UploadError, match="holds 2 bytes, the tensor table declares 3 indices"):
        delta_decode(delta_encode([np.array([1, 2])]), [3], [10], ["w"])
    with pytest.raises(UploadError, match="longer than 5 bytes"):
        decode_varints(np.array([0x80] * 5 + [1], np.uint8))


# --- codecs: round trips within their bounds ---------------------------------------------

def test_dense_is_exact_and_quantized_is_within_one_step():
    update = make_update()
    decoded, _ = roundtrip("dense", update)
    assert all(np.array_equal(decoded[k], update[k]) for k in update)
    for chain, bits in (("q8", 8), ("q4:64", 4), ("q2:0", 2)):
        block = parse_chain(chain).block
        decoded, params = roundtrip(chain, update)
        assert params["codec"] == "quantized" and params["bits"] == bits
        for name, x in update.items():
            flat = x.ravel()
            scales = np.concatenate([np.abs(flat[i:i + block]).max(keepdims=True)
                                     for i in range(0, flat.size, block)]) if block \
                else np.abs(flat).max(keepdims=True)
            step = 2 * scales / ((1 << bits) - 1)
            bound = np.repeat(step, block)[: flat.size] if block else step[0]
            assert (np.abs(decoded[name].ravel() - flat) <= bound * (1 + 1e-5)).all(), chain


@pytest.mark.parametrize("chain", ["topk:0.05:tensor", "topk:0.05", "topk:30:tensor", "topk:300"])
def test_topk_keeps_the_largest_entries_exactly(chain):
    update = make_update()
    decoded, params = roundtrip(chain, update)
    spec = parse_chain(chain)
    kept = {k: decoded[k] != 0 for k in update}
    if spec.topk_scope == "tensor":
        for name, x in update.items():
            expected = max(1, int(np.ceil(spec.topk * x.size))) if spec.topk < 1 \
                else min(int(spec.topk), x.size)
            assert kept[name].sum() == expected
            assert np.array_equal(decoded[name][kept[name]], x[kept[name]])
            assert np.abs(x[~kept[name]]).max() <= np.abs(x[kept[name]]).min()
    else:
        everything = np.concatenate([np.abs(x).ravel() for x in update.values()])
        expected = int(spec.topk) if spec.topk >= 1 else int(np.ceil(spec.topk * everything.size))
        assert sum(int(k.sum()) for k in kept.values()) == expected
        smallest_kept = min(np.abs(update[k][kept[k]]).min() for k in update if kept[k].any())
        assert all(np.abs(update[k][~kept[k]]).max() <= smallest_kept for k in update)
        assert len(params["tensors"]) == sum(1 for k in kept.values() if k.any())
    total = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in update.values())
    error = sum(float(np.sum((decoded[k] - update[k]).astype(np.float64) ** 2)) for k in update)
    fraction = sum(int(k.sum()) for k in kept.values()) / sum(x.size for x in update.values())
    assert error <= (1 - fraction) * total


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_topk_sends_small_tensors_whole_and_spends_its_budget_on_the_rest(scope):
    update = make_update()
    decoded, params = roundtrip(f"topk:0.05:{scope}:96", update)
    small = [k for k, x in update.items() if x.size <= 96]
    assert small == ["layer.bias", "classifier.weight"]
    for name in small:
        assert np.array_equal(decoded[name], update[name])
    large = [k for k in update if k not in small]
    kept = sum(int((decoded[k] != 0).sum()) for k in large)
    if scope == "global":
        assert kept == int(np.ceil(0.05 * sum(update[k].size for k in large)))
    else:
        assert kept == sum(int(np.ceil(0.05 * update[k].size)) for k in large)


def test_topk_with_quantized_values_bounds_kept_and_dropped_entries():
    update = make_update()
    decoded, params = roundtrip("topk:0.05:tensor,q4:0", update)
    assert params["codec"] == "topk" and params["bits"] == 4
    for name, x in update.items():
        order = np.argsort(-np.abs(x.ravel()), kind="stable")
        count = int(np.ceil(0.05 * x.size))
        kept, dropped = order[:count], order[count:]
        step = 2 * np.abs(x.ravel()[kept]).max() / 15
        assert (np.abs(decoded[name].ravel()[kept] - x.ravel()[kept]) <= step * (1 + 1e-5)).all()
        assert (decoded[name].ravel()[dropped] == 0).all()


@pytest.mark.parametrize("method", available_methods())
def test_lossless_pass_changes_bytes_not_values(method):
    update = make_update()
    plain, plain_params = roundtrip("topk:0.05", update)
    packed, packed_params = roundtrip(f"topk:0.05,{method}", update)
    assert packed_params["lossless"] == method
    assert all(np.array_equal(plain[k], packed[k]) for k in update)
    plain_payload, _, _ = build_codec("topk:0.05").encode(update, None)
    packed_payload, _, _ = build_codec(f"topk:0.05,{method}").encode(update, None)
    assert packed_payload.count_bytes() < plain_payload.count_bytes()


# --- chains from the run config -----------------------------------------------------------

def test_chains_parse_in_any_order_into_one_pipeline():
    spec = parse_chain("zlib, q4:128, ef, topk:0.001:tensor")
    assert (spec.topk, spec.topk_scope, spec.bits, spec.block, spec.error_feedback,
            spec.lossless) == (0.001, "tensor", 4, 128, True, "zlib")
    assert parse_chain("topk:0.01").topk_scope == "global"
    assert parse_chain("topk:0.01:global:4096").topk_whole_below == 4096
    assert parse_chain("dense") == parse_chain("dense")
    assert CompressionConfig.from_mapping({"upload-codec": "topk:100,ef,q8"}).upload_codec


@pytest.mark.parametrize("chain,complaint", [
    ("gzip", "unknown stage 'gzip'"),
    ("q3", "3 bits is not offered"),
    ("q4:abc", "block of 'q4' must be a whole number"),
    ("topk:0", "topk needs a fraction"),
    ("topk:1.5", "topk needs a fraction"),
    ("topk:0.1:layer", "scope must be one of"),
    ("topk:0.1:global:big", "whole-tensor size of topk must be a whole number"),
    ("ef", "'ef' needs a lossy stage"),
    ("dense,q8", "'dense' cannot be combined"),
    ("q8,q4", "stage 'q' appears twice"),
    ("topk:0.1,zlib,lzma", "stage 'lossless' appears twice"),
])
def test_bad_chains_are_refused_naming_the_key(chain, complaint):
    with pytest.raises(ConfigError, match=f"'upload-codec'.*{complaint}"):
        CompressionConfig.from_mapping({"upload-codec": chain})


def test_error_feedback_is_refused_for_the_downlink():
    with pytest.raises(ConfigError, match="'download-codec': leave out 'ef'"):
        CompressionConfig.from_mapping({"download-codec": "topk:0.01,ef"})


# --- error feedback -----------------------------------------------------------------------

def _running_sums(chain: str, rounds: int, checkpoints=(20, 80)):
    """Relative gap between the running sums of sent and true updates at ``checkpoints``."""
    codec = build_codec(chain, np.random.default_rng(7))
    rng = np.random.default_rng(8)
    drift = make_update(seed=9, heavy_tail=False)
    true_sum = OrderedDict((k, np.zeros(s, np.float64)) for k, s in SHAPES.items())
    sent_sum = OrderedDict((k, np.zeros(s, np.float64)) for k, s in SHAPES.items())
    state, gaps = None, []
    for done in range(1, rounds + 1):
        update = OrderedDict((k, (v + 1e-3 * rng.normal(size=v.shape)).astype(np.float32))
                             for k, v in drift.items())
        payload, params, state = codec.encode(update, state)
        sent = decode_upload(payload, params, SHAPES)
        for k in SHAPES:
            true_sum[k] += update[k]
            sent_sum[k] += sent[k]
        if done in checkpoints:
            gap = np.sqrt(sum(np.sum((true_sum[k] - sent_sum[k]) ** 2) for k in SHAPES))
            gaps.append(gap / np.sqrt(sum(np.sum(true_sum[k] ** 2) for k in SHAPES)))
    return gaps, state, true_sum, sent_sum


def test_error_feedback_keeps_the_sum_sent_on_the_sum_of_true_updates():
    (ef_20, ef_80), residual, true_sum, sent_sum = _running_sums("topk:0.05:tensor,ef,q4", 80)
    (plain_20, plain_80), no_state, _, _ = _running_sums("topk:0.05:tensor,q4", 80)
    assert no_state is None
    # what was not sent is exactly the residual the client keeps ...
    for name, array in residual.items():
        assert np.allclose(true_sum[name] - sent_sum[name], array.numpy(), atol=1e-5)
    # ... which stays bounded, so the relative gap shrinks like 1/rounds
    assert ef_80 < 0.15 and ef_80 < ef_20 / 2.5
    # without error feedback the dropped mass is lost for good: the gap does not close
    assert plain_80 > 0.5 and plain_80 > 0.9 * plain_20


def test_error_feedback_state_survives_a_fresh_process_through_the_context():
    """Deployment gives each message a fresh ClientApp process; the SuperNode keeps the
    Context (as protobuf) between them. Two rounds, each in its own process."""
    script = textwrap.dedent("""
        import sys
        from collections import OrderedDict
        import numpy as np
        from flwr.common.serde import context_from_proto, context_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from sepal.codecs import build_codec
        from sepal.wire import record_to_arrays
        from tests.test_codecs import make_update

        path, seed = sys.argv[1], int(sys.argv[2])
        proto = ProtoContext()
        proto.ParseFromString(open(path, "rb").read())
        context = context_from_proto(proto)
        state = context.state["codec-state"] if "codec-state" in context.state else None
        codec = build_codec("topk:0.02,ef,q4", np.random.default_rng(seed))
        payload, params, new_state = codec.encode(make_update(seed), state)
        context.state["codec-state"] = new_state
        open(path, "wb").write(context_to_proto(context).SerializeToString())
        np.savez(path + f".sent{seed}.npz", **record_to_arrays(payload))
    """)
    folder = Path(tempfile.mkdtemp(prefix="sepal-ef-"))
    context_file = folder / "context.pb"
    context_file.write_bytes(context_to_proto(
        Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    ).SerializeToString())
    for seed in (1, 2):
        subprocess.run([sys.executable, "-c", script, str(context_file), str(seed)], check=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])

    codec = build_codec("topk:0.02,ef,q4", np.random.default_rng(1))
    _, _, state = codec.encode(make_update(1), None)
    codec = build_codec("topk:0.02,ef,q4", np.random.default_rng(2))
    payload, _, _ = codec.encode(make_update(2), state)
    second = np.load(str(context_file) + ".sent2.npz")
    # round 2 in its own process sent exactly what it sends with round 1's residual in memory
    for key, array in payload.items():
        assert np.array_equal(second[key], array.numpy())
    forgetful, _, _ = build_codec("topk:0.02,ef,q4", np.random.default_rng(2)).encode(
        make_update(2), None)
    assert any(not np.array_equal(second[k], a.numpy()) for k, a in forgetful.items())
