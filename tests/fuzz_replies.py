"""Property-based fuzzing of train replies: real uploads, mutated field by field.

Every codec chain encodes a real update of a model-shaped global (word embeddings,
attention, biases, a head); hypothesis then mutates the reply: codec parameters set to
any type and size, streams replaced, truncated, corrupted or given ``.npy`` headers that
claim huge arrays, records dropped or swapped for records of another kind, example
counts and metrics set to anything, privacy reports and refusals forged. One round
(two honest replies and the mutated one) goes through the server's decode + validate
path and Flower's FedAvg. The properties:

* no exception escapes: the mutated reply is accepted or rejected with a reason;
* decoding the mutated reply alone peaks below ``MEMORY_FACTOR`` x the model's bytes
  (plus the lzma decoder's capped dictionary, ``LZMA_MEMLIMIT``);
* the honest replies are always accepted and the aggregate is finite; when the mutated
  reply is rejected the aggregate is exactly FedAvg of the honest ones.

Shared by ``tests/test_fuzz_uploads.py`` (the CI profile) and
``benchmarks/fuzz_uploads.py`` (the long profile).
"""

from __future__ import annotations

import functools
import io
import tracemalloc
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID, SType
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import strategies as st

from sepal import wire
from sepal.codecs import build_codec
from sepal.codecs.lossless import LZMA_MEMLIMIT
from server.uploads import decode_replies

MEMORY_FACTOR = 4
FIXED_ALLOWANCE = 1 << 20  # interpreter one-time costs (first log record, caches), any model
# The largest tensor dominates, as BERT's word embeddings do.
GLOBAL = OrderedDict([
    ("embeddings.word_embeddings.weight", np.full((1000, 32), 0.02, np.float32)),
    ("encoder.layer.0.attention.self.query.weight", np.full((32, 32), 0.01, np.float32)),
    ("encoder.layer.0.attention.self.query.bias", np.zeros(32, np.float32)),
    ("classifier.weight", np.full((2, 32), -0.01, np.float32)),
    ("classifier.bias", np.zeros(2, np.float32)),
])
MODEL_BYTES = sum(array.nbytes for array in GLOBAL.values())
CHAINS = ("dense", "q8", "q4:64", "q2:0", "topk:0.05", "topk:0.1:tensor:64,q8", "dense,zlib",
          "topk:0.02,q4,lzma", "q8:256,zlib")
HONEST_NODES = (1, 2)
FUZZED_NODE = 3
EXAMPLES = 100

INT64 = st.integers(min_value=-2**63, max_value=2**63 - 1)
SIZES = st.one_of(st.integers(-3, 300), st.sampled_from([2**16, 2**31, 2**32 + 1, 2**62, 10**12,
                                                          2**63 - 1, -2**63]), INT64)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([3.4e38, -3.4e38, 1e300, 0.0, -0.0, 1.0]))
SCALARS = st.one_of(SIZES, FLOATS, st.booleans(), st.text(max_size=12), st.binary(max_size=24))
CONFIG_VALUES = st.one_of(SCALARS, st.lists(SIZES, max_size=8), st.lists(FLOATS, max_size=4),
                          st.lists(st.text(max_size=40), max_size=6),
                          st.lists(st.binary(max_size=8), max_size=3))
METRIC_VALUES = st.one_of(SIZES, FLOATS, st.lists(SIZES, max_size=4),
                          st.lists(FLOATS, max_size=4))
PARAM_KEYS = ("wire-version", "codec", "bits", "block", "tensors", "ranks", "dims", "counts",
              "lossless", "lossless-streams", "lossless-sizes", "unexpected")
METRIC_KEYS = (wire.NUM_EXAMPLES, "train-loss", "train-accuracy", "train-steps", "unexpected")
RECORD_KEYS = (wire.UPDATE_KEY, wire.CODEC_KEY, wire.METRICS_KEY, wire.PRIVACY_KEY,
               wire.REFUSAL_KEY)
DTYPES = ("uint8", "uint16", "int64", "float16", "float32", "float64", "bool", "complex64")


def honest_update(node: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return OrderedDict((name, (0.01 * rng.standard_normal(array.shape)).astype(np.float32))
                       for name, array in GLOBAL.items())


def reply_content(node: int, chain: str) -> RecordDict:
    """What a client sends: the codec's payload and params, and its metrics (a fresh
    copy each time: mutations replace its records' entries)."""
    payload, params, metrics = _encoded(node, chain)
    return RecordDict({wire.UPDATE_KEY: ArrayRecord(OrderedDict(payload.items())),
                       wire.CODEC_KEY: ConfigRecord(dict(params)),
                       wire.METRICS_KEY: MetricRecord(dict(metrics))})


@functools.lru_cache(maxsize=None)
def _encoded(node: int, chain: str) -> tuple[ArrayRecord, ConfigRecord, MetricRecord]:
    codec = build_codec(chain, np.random.default_rng(100 + node))
    payload, params, _ = codec.encode(honest_update(node), None)
    metrics = MetricRecord({wire.NUM_EXAMPLES: EXAMPLES, "train-loss": 0.5,
                            "train-accuracy": 0.75, "train-steps": 4})
    return payload, params, metrics


@functools.lru_cache(maxsize=None)
def honest_aggregate(chain: str) -> dict[str, np.ndarray]:
    """FedAvg of the honest replies alone."""
    decoded = decode_replies([as_reply(node, reply_content(node, chain))
                              for node in HONEST_NODES], GLOBAL)
    arrays, _ = FedAvg().aggregate_train(1, decoded.accepted)
    return {name: array.numpy() for name, array in arrays.items()}


def as_reply(node: int, content: RecordDict) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"instruction-{node}"
    return Message(content, reply_to=instruction)


def npy_claiming(shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    """An ``.npy`` header announcing ``shape`` followed by ``payload`` (any size)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return header.getvalue() + payload


# -- mutations: each changes one thing of ``content``; Flower may refuse a value that
# its records cannot hold at all, which then is no reply a client could send --------------

@st.composite
def set_param(draw, content: RecordDict) -> str:
    key, value = draw(st.sampled_from(PARAM_KEYS)), draw(CONFIG_VALUES)
    _record(content, wire.CODEC_KEY, ConfigRecord)[key] = value
    return f"codec[{key!r}] = {value!r:.60}"


@st.composite
def drop_param(draw, content: RecordDict) -> str:
    record = _record(content, wire.CODEC_KEY, ConfigRecord)
    key = draw(st.sampled_from(sorted(record.keys()) or ["none"]))
    record.pop(key, None)
    return f"del codec[{key!r}]"


@st.composite
def set_metric(draw, content: RecordDict) -> str:
    key, value = draw(st.sampled_from(METRIC_KEYS)), draw(METRIC_VALUES)
    _record(content, wire.METRICS_KEY, MetricRecord)[key] = value
    return f"metrics[{key!r}] = {value!r:.60}"


@st.composite
def replace_stream(draw, content: RecordDict) -> str:
    record = _record(content, wire.UPDATE_KEY, ArrayRecord)
    key = draw(st.sampled_from(sorted(record.keys()) + ["values", "levels", "scales",
                                                        "indices", "unexpected"]))
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 70), min_size=0, max_size=3)))
    fill = draw(st.sampled_from([0, 1, 127, 128, 255, -1, np.inf, np.nan, 3.4e38]))
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.full(shape, fill).astype(dtype)
    record[key] = Array(array)
    return f"stream {key!r} = {dtype}{list(shape)} of {fill}"


@st.composite
def huge_header(draw, content: RecordDict) -> str:
    record = _record(content, wire.UPDATE_KEY, ArrayRecord)
    key = draw(st.sampled_from(sorted(record.keys()) or ["values"]))
    count = draw(st.sampled_from([2**20, 2**31, 10**12, 2**40]))
    dtype = draw(st.sampled_from(("uint8", "float32", "float64")))
    payload = draw(st.binary(max_size=64))
    record[key] = Array(dtype=dtype, shape=(count,), stype=SType.NUMPY,
                        data=npy_claiming((count,), dtype, payload))
    return f"stream {key!r} claims {count} x {dtype}"


@st.composite
def corrupt_stream(draw, content: RecordDict) -> str:
    record = _record(content, wire.UPDATE_KEY, ArrayRecord)
    if not len(record):
        return "no stream to corrupt"
    key = draw(st.sampled_from(sorted(record.keys())))
    array = record[key]
    data = bytearray(array.data)
    how = draw(st.sampled_from(("flip", "truncate", "extend", "stype")))
    if how == "flip" and data:
        position = draw(st.integers(0, len(data) - 1))
        data[position] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data))):]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    stype = "torch.Tensor" if how == "stype" else array.stype
    record[key] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=stype,
                        data=bytes(data))
    return f"stream {key!r}: {how}"


@st.composite
def drop_stream(draw, content: RecordDict) -> str:
    record = _record(content, wire.UPDATE_KEY, ArrayRecord)
    key = draw(st.sampled_from(sorted(record.keys()) or ["none"]))
    record.pop(key, None)
    return f"del stream {key!r}"


@st.composite
def scale_values(draw, content: RecordDict) -> str:
    """Float streams multiplied, up to float32's largest finite value."""
    record = _record(content, wire.UPDATE_KEY, ArrayRecord)
    factor = draw(st.sampled_from([-1.0, 1e3, 1e30, 3.4e38]))
    for key in sorted(record.keys()):
        array = wire.read_array(record[key], key)
        if array.dtype == np.float32:
            with np.errstate(over="ignore"):
                scaled = np.clip(array.astype(np.float64) * factor, -3.4e38, 3.4e38)
            record[key] = Array(scaled.astype(np.float32))
    return f"float streams x {factor}"


@st.composite
def swap_record(draw, content: RecordDict) -> str:
    key = draw(st.sampled_from(RECORD_KEYS))
    kind = draw(st.sampled_from(("array", "config", "metric", "drop")))
    if kind == "drop":
        content.pop(key, None)
    else:
        content[key] = {"array": ArrayRecord(), "config": ConfigRecord({"x": 1}),
                        "metric": MetricRecord({wire.NUM_EXAMPLES: 5})}[kind]
    return f"record {key!r} -> {kind}"


@st.composite
def forge_privacy(draw, content: RecordDict) -> str:
    key = draw(st.sampled_from((wire.PRIVACY_KEY, wire.REFUSAL_KEY)))
    fields = draw(st.dictionaries(st.sampled_from(("epsilon", "delta", "code", "reason")),
                                  SCALARS, max_size=4))
    content[key] = ConfigRecord(fields)
    return f"record {key!r} = {fields!r:.80}"


MUTATIONS = (set_param, drop_param, set_metric, replace_stream, huge_header, corrupt_stream,
             drop_stream, scale_values, swap_record, forge_privacy)


@st.composite
def mutated_reply(draw) -> tuple[str, RecordDict, list[str]]:
    chain = draw(st.sampled_from(CHAINS))
    content = reply_content(FUZZED_NODE, chain)
    applied = []
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        try:
            applied.append(draw(mutation(content)))
        except (TypeError, ValueError) as err:  # a value Flower's records cannot hold
            applied.append(f"{mutation.__name__} refused by Flower ({err.__class__.__name__})")
    return chain, content, applied


def _record(content: RecordDict, key: str, kind: type):
    if not isinstance(content.get(key), kind):
        content[key] = kind()
    return content[key]


# -- the properties -----------------------------------------------------------------------

@dataclass
class Outcome:
    accepted: bool
    reason: str
    peak_bytes: int
    limit_bytes: int


def memory_limit(content: RecordDict) -> int:
    """``MEMORY_FACTOR`` x the model plus a fixed allowance, plus the lzma decoder's capped
    dictionary when the reply asks for lzma (fixed costs, whatever the model)."""
    params = content.get(wire.CODEC_KEY)
    lzma = isinstance(params, ConfigRecord) and params.get("lossless") == "lzma"
    return MEMORY_FACTOR * MODEL_BYTES + FIXED_ALLOWANCE + (LZMA_MEMLIMIT if lzma else 0)


def check_round(chain: str, content: RecordDict) -> Outcome:
    """Decode the mutated reply alone (memory), then a round with two honest replies."""
    decode_replies([as_reply(HONEST_NODES[0], reply_content(HONEST_NODES[0], chain))], GLOBAL)
    reply = as_reply(FUZZED_NODE, content)  # the received message is not the decoder's cost
    tracemalloc.start()  # after a warm-up decode: one-time imports and caches are not the reply's
    try:
        tracemalloc.reset_peak()
        alone = decode_replies([reply], GLOBAL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outcome = Outcome(accepted=bool(alone.accepted),
                      reason=alone.rejected.get(FUZZED_NODE, ""), peak_bytes=peak,
                      limit_bytes=memory_limit(content))
    assert outcome.accepted != bool(alone.rejected) or FUZZED_NODE in alone.refused, \
        "the reply must be accepted, rejected with a reason or a refusal"
    assert peak < outcome.limit_bytes, f"decoding took {peak} bytes, model {MODEL_BYTES}"

    honest = [as_reply(node, reply_content(node, chain)) for node in HONEST_NODES]
    decoded = decode_replies([*honest, as_reply(FUZZED_NODE, content)], GLOBAL)
    accepted_nodes = [m.metadata.src_node_id for m in decoded.accepted]
    assert set(HONEST_NODES) <= set(accepted_nodes), decoded.rejected
    arrays, _ = FedAvg().aggregate_train(1, decoded.accepted)
    assert arrays is not None
    result = {name: array.numpy() for name, array in arrays.items()}
    assert all(np.isfinite(array).all() for array in result.values())
    if FUZZED_NODE not in accepted_nodes:
        expected = honest_aggregate(chain)
        assert all(np.array_equal(result[name], expected[name]) for name in result)
    return outcome
