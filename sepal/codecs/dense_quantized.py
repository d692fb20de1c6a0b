"""Dense stochastic quantization: every value of every tensor, at 8, 4 or 2 bits.

Streams and params of :class:`~sepal.codecs.values.QuantizedValues` plus the tensor
table (all tensors of the update). Unbiased: ``E[decode(encode(x))] = x``; each value
is within one grid step ``2 s / (2**bits - 1)`` of the original, ``s`` the largest
magnitude of its block (its tensor when ``block = 0``). Size: ``bits / 32`` of dense
float32 plus 4 bytes per block.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from sepal.codecs.base import Codec, expect_streams
from sepal.codecs.table import TensorEntry, model_size, read_table, write_table
from sepal.codecs.values import QuantizedValues, ValueCoding
from sepal.wire import UploadError


class QuantizedCodec(Codec):
    name = "quantized"

    def __init__(self, values: QuantizedValues):
        self.values = values

    def encode_streams(self, update, state):
        entries = [TensorEntry(k, tuple(v.shape), v.size) for k, v in update.items()]
        streams, params = self.values.encode(
            [np.asarray(v, dtype=np.float32).ravel() for v in update.values()])
        return streams, {**write_table(entries, with_counts=False), **params}, state

    @classmethod
    def decode_streams(cls, streams, params, shapes):
        entries = read_table(params, shapes, with_counts=False)
        values = ValueCoding.from_params(params, model_size(shapes))
        if not isinstance(values, QuantizedValues):
            raise UploadError("codec parameter 'bits' missing from a quantized upload")
        expect_streams(streams, set(values.streams))
        vectors = values.decode(streams, params, entries)
        decoded = OrderedDict((name, np.zeros(shape, np.float32)) for name, shape in shapes.items())
        for entry, vector in zip(entries, vectors):
            decoded[entry.name] = vector.reshape(entry.shape)
        return decoded
