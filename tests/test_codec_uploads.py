"""Malformed uploads: each kind is rejected with a reason naming the client and the
defect, and the round still aggregates the valid uploads with a real flwr strategy."""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from sepal import wire
from sepal.codecs import build_codec
from sepal.codecs.table import TensorEntry, write_table
from sepal.codecs.varint import delta_encode, encode_varints
from server.uploads import decode_replies

GLOBAL = OrderedDict([("encoder.weight", np.full((40, 8), 0.5, np.float32)),
                      ("encoder.bias", np.zeros(8, np.float32)),
                      ("head.weight", np.ones((2, 8), np.float32))])
SHAPES = {k: v.shape for k, v in GLOBAL.items()}


def update_for(node: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return OrderedDict((k, rng.normal(scale=0.01, size=v.shape).astype(np.float32))
                       for k, v in GLOBAL.items())


def reply(node: int, payload: ArrayRecord, params: ConfigRecord, examples: int = 10) -> Message:
    """A train reply from ``node`` as the ServerApp's grid hands it over."""
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"train-{node}", group_id="1",
                        created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    content = RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                          wire.METRICS_KEY: MetricRecord({wire.NUM_EXAMPLES: examples})})
    return Message(content=content, metadata=metadata)


def encoded(chain: str, node: int = 99):
    payload, params, _ = build_codec(chain, np.random.default_rng(node)).encode(
        update_for(node), None)
    return payload, params


def with_stream(payload: ArrayRecord, key: str, array: np.ndarray) -> ArrayRecord:
    streams = wire.record_to_arrays(payload)
    streams[key] = array
    return wire.arrays_to_record(streams)


def with_params(params: ConfigRecord, **changes) -> ConfigRecord:
    return ConfigRecord({**dict(params), **{k.replace("_", "-"): v for k, v in changes.items()}})


def handmade_topk(indices: list[int], tensor: str = "encoder.bias", stream=None):
    """A top-k upload of one tensor with the given indices (float32 values)."""
    params = ConfigRecord({
        "wire-version": wire.WIRE_VERSION, "codec": "topk",
        **write_table([TensorEntry(tensor, SHAPES[tensor], len(indices))], with_counts=True)})
    payload = wire.arrays_to_record({
        "values": np.ones(len(indices), np.float32),
        "indices": delta_encode([np.array(indices)]) if stream is None else stream})
    return payload, params


def _truncated_levels():
    payload, params = encoded("q4")
    levels = payload["levels"].numpy()
    return with_stream(payload, "levels", levels[:-1]), params


def _scale(value):
    payload, params = encoded("topk:0.2,q8")
    scales = payload["scales"].numpy().copy()
    scales[0] = value
    return with_stream(payload, "scales", scales), params


def _renamed():
    payload, params = encoded("q8")
    return payload, with_params(params, tensors=["decoder.weight", *params["tensors"][1:]])


def _reshaped():
    payload, params = encoded("topk:0.1:tensor")
    dims = list(params["dims"])
    dims[0], dims[1] = dims[1], dims[0]  # (40, 8) -> (8, 40): same size, other shape
    return payload, with_params(params, dims=dims)


def _bomb():
    payload, params = encoded("topk:0.1,zlib")
    bomb = np.frombuffer(zlib.compress(b"\0" * 50_000_000), dtype=np.uint8)
    return (with_stream(payload, "indices", bomb),
            with_params(params, lossless_sizes=[50_000_000] * len(params["lossless-sizes"])))


def _larger_than_declared():
    payload, params = encoded("topk:0.1,zlib")
    bomb = np.frombuffer(zlib.compress(b"\0" * 50_000_000), dtype=np.uint8)
    return with_stream(payload, "indices", bomb), params


def _corrupt_zlib():
    payload, params = encoded("topk:0.1,zlib")
    return with_stream(payload, "indices", np.frombuffer(b"not zlib at all", np.uint8)), params


def _nan_dense():
    update = update_for(5)
    update["head.weight"][0, 0] = np.nan
    payload, params, _ = build_codec("dense").encode(update, None)
    return payload, params


MALFORMED = {
    "wrong length": (_truncated_levels, "stream 'levels' has .* bytes"),
    "index out of range": (lambda: handmade_topk([1, 8]), "index 8 out of range"),
    "duplicate indices": (lambda: handmade_topk([1, 4, 4]), "duplicate index 4"),
    "truncated varint": (
        lambda: handmade_topk([1], stream=np.array([0x81], np.uint8)), "truncated"),
    "more indices than declared": (
        lambda: handmade_topk([1], stream=encode_varints(np.array([1, 1], np.uint64))),
        "holds more than the 1 indices the tensor table declares"),
    "NaN scale": (lambda: _scale(np.nan), "scale is NaN or Inf"),
    "Inf scale": (lambda: _scale(np.inf), "scale is NaN or Inf"),
    "unknown codec": (lambda: (encoded("q8")[0], with_params(encoded("q8")[1], codec="fancy")),
                      "unknown codec 'fancy'"),
    "old version": (lambda: (encoded("q8")[0], with_params(encoded("q8")[1], wire_version=1)),
                    "wire-version 1 is not supported"),
    "unknown version": (lambda: (encoded("dense")[0],
                                 with_params(encoded("dense")[1], wire_version=99)),
                        "wire-version 99 is not supported"),
    "tensor not in the model": (_renamed, "tensor 'decoder.weight' is not in the model"),
    "shape not in the model": (_reshaped, r"tensor 'encoder.weight' has shape \(8, 40\)"),
    "unknown lossless method": (
        lambda: (encoded("topk:0.1,zlib")[0],
                 with_params(encoded("topk:0.1,zlib")[1], lossless="brotli")),
        "lossless method 'brotli' is not available"),
    "corrupt lossless stream": (_corrupt_zlib, "does not decompress with zlib"),
    "decompression bomb": (_bomb, "exceed what this model allows"),
    "stream larger than declared": (_larger_than_declared,
                                    "'indices' decompresses to more than"),
    "NaN in a dense update": (_nan_dense, "tensor 'head.weight' holds .*NaN or Inf"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_upload_is_rejected_and_the_round_aggregates_the_rest(kind, caplog):
    make, reason = MALFORMED[kind]
    good = [reply(node, *build_codec(chain, np.random.default_rng(node)).encode(
        update_for(node), None)[:2], examples=10 * node)
        for node, chain in ((1, "topk:0.25,ef,q8,zlib"), (2, "q4"), (3, "dense"))]
    bad = reply(13, *make())

    with caplog.at_level(logging.WARNING, logger="sepal.server"):
        decoded = decode_replies([good[0], bad, good[1], good[2]], GLOBAL)

    assert list(decoded.rejected) == [13]
    assert re.search(reason, decoded.rejected[13]), decoded.rejected[13]
    assert any("client 13" in r.getMessage() and re.search(reason, r.getMessage())
               for r in caplog.records)
    models = {m.metadata.src_node_id: m.content[wire.ARRAYS_KEY] for m in decoded.accepted}
    assert list(models) == [1, 2, 3]
    updates = {node: {k: models[node][k].numpy() - GLOBAL[k] for k in GLOBAL} for node in models}
    assert all(np.allclose(updates[3][k], update_for(3)[k], atol=1e-6) for k in GLOBAL)
    assert set(decoded.bytes_up) == {1, 2, 3, 13}

    arrays, _ = FedAvg().aggregate_train(1, decoded.accepted)
    weights = {1: 10, 2: 20, 3: 30}
    for name, value in GLOBAL.items():
        expected = value + sum(weights[n] * updates[n][name] for n in weights) / 60
        assert np.allclose(arrays[name].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("chain", ["dense", "q8", "topk:0.25,ef,q4,zlib", "q2:0"])
def test_serialized_size_is_the_protobuf_size_of_the_reply(chain):
    from flwr.common.serde import recorddict_to_proto

    content = reply(7, *encoded(chain)).content
    content[wire.PRIVACY_KEY] = ConfigRecord({"epsilon": 1.5, "delta": 1e-5})
    content["empty"] = ArrayRecord(OrderedDict(nothing=wire.npy_array(np.zeros(0, np.float32))))
    assert wire.serialized_size(content) == recorddict_to_proto(content).ByteSize()
