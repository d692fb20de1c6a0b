"""Top-k sparsification: send only the k largest-magnitude entries of the update.

``k`` is a fraction of the elements (``0 < k < 1``, at least one is kept) or a count
(``k >= 1``), taken over the whole update (``scope = "global"``: the k largest
anywhere; tensors with none kept are left out of the upload) or per tensor
(``scope = "tensor"``: every tensor sends its own top k, so none is starved, but
large tensors whose update is mostly noise, such as the word embeddings under
weight decay, take their share of the budget too). Tensors of at most ``whole_below``
elements (biases, LayerNorm, a classification head) are sent whole and the budget ``k``
applies to the rest: under AdamW every coordinate moves by about the learning rate, so
magnitude alone would starve a freshly initialised head that the model cannot do
without (the small-layer exemption of Deep Gradient Compression).

Streams: ``indices`` (each tensor's kept positions, delta-encoded varints, see
:mod:`sepal.codecs.varint`) plus the value coding's streams (float32 or quantized);
params: the tensor table with ``counts``. Error bound: a dropped entry is no larger
in magnitude than the smallest kept one of its scope, and
``||x - x_hat||^2 <= (1 - k/d) ||x||^2``; kept entries are exact with float32 values
and within one quantization step otherwise.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from sepal.codecs.base import Codec, expect_streams, take_stream
from sepal.codecs.table import TensorEntry, model_size, read_table, write_table
from sepal.codecs.values import ValueCoding
from sepal.codecs.varint import delta_decode, delta_encode

SCOPES = ("global", "tensor")


class TopKCodec(Codec):
    name = "topk"

    def __init__(self, k: float, scope: str, values: ValueCoding, whole_below: int = 0):
        self.k = k
        self.scope = scope
        self.values = values
        self.whole_below = whole_below

    def kept(self, size: int) -> int:
        """How many of ``size`` elements the scope keeps."""
        if self.k >= 1:
            return min(int(self.k), size)
        return min(size, max(1, math.ceil(self.k * size)))

    def select(self, flat: OrderedDict[str, np.ndarray]) -> list[np.ndarray]:
        """Sorted flat indices of the entries kept in each tensor."""
        whole = [v.size <= self.whole_below for v in flat.values()]
        sparse = [v for v, w in zip(flat.values(), whole) if not w]
        if self.scope == "tensor":
            chosen = iter([_top_indices(np.abs(v), self.kept(v.size)) for v in sparse])
        else:
            chosen = iter(_global_top_indices(sparse, self.kept(sum(v.size for v in sparse))))
        return [np.arange(v.size) if w else next(chosen) for v, w in zip(flat.values(), whole)]

    def encode_streams(self, update, state):
        flat = OrderedDict((k, np.asarray(v, dtype=np.float32).ravel()) for k, v in update.items())
        selected = self.select(flat)
        entries, indices, vectors = [], [], []
        for (name, values), idx in zip(flat.items(), selected):
            if idx.size:
                entries.append(TensorEntry(name, tuple(np.shape(update[name])), idx.size))
                indices.append(idx)
                vectors.append(values[idx])
        streams, params = self.values.encode(vectors)
        streams["indices"] = delta_encode(indices)
        return streams, {**write_table(entries, with_counts=True), **params}, state

    @classmethod
    def decode_streams(cls, streams, params, shapes):
        entries = read_table(params, shapes, with_counts=True)
        values = ValueCoding.from_params(params, model_size(shapes))
        expect_streams(streams, {"indices"} | set(values.streams))
        indices = delta_decode(take_stream(streams, "indices", np.uint8),
                               [e.count for e in entries], [e.size for e in entries],
                               [e.name for e in entries])
        vectors = values.decode(streams, params, entries)
        decoded = OrderedDict((name, np.zeros(shape, np.float32)) for name, shape in shapes.items())
        for entry, idx, vector in zip(entries, indices, vectors):
            decoded[entry.name].reshape(-1)[idx] = vector
        return decoded


def _global_top_indices(tensors: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Per tensor, the sorted indices of the ``k`` largest magnitudes over all of them."""
    if not tensors:
        return []
    magnitudes = np.concatenate([np.abs(v) for v in tensors])
    chosen = _top_indices(magnitudes, k)
    bounds = np.cumsum([0] + [v.size for v in tensors])
    cuts = np.searchsorted(chosen, bounds)
    return [chosen[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(tensors))]


def _top_indices(magnitudes: np.ndarray, k: int) -> np.ndarray:
    if k >= magnitudes.size:
        return np.arange(magnitudes.size)
    return np.sort(np.argpartition(magnitudes, magnitudes.size - k)[magnitudes.size - k:])
