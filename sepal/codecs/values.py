"""How the values a codec carries travel: as float32, or stochastically quantized.

Each codec hands over one float vector per tensor in its table (all of a tensor's
values, or only the kept ones); a value coding turns them into streams and back.

``Float32Values``   stream ``values`` (float32), exact.
``QuantizedValues`` streams ``levels`` (bit-packed, uint8) and ``scales`` (float32, one
                    per block of each tensor's vector); params ``bits`` and ``block``.
                    Unbiased; each value within one grid step ``2 s / (2**bits - 1)``
                    of the original, ``s`` its block's largest magnitude.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from sepal.codecs.base import Params, Streams, param, take_stream
from sepal.codecs.stochastic_quantization import (
    Quantized,
    dequantize,
    num_blocks,
    pack_levels,
    packed_size,
    quantize,
    unpack_levels,
)
from sepal.codecs.table import TensorEntry
from sepal.wire import UploadError

CODEC_BITS = (2, 4, 8)


class ValueCoding(ABC):
    streams: frozenset[str]

    @abstractmethod
    def encode(self, vectors: list[np.ndarray]) -> tuple[Streams, Params]:
        """Streams and params carrying ``vectors`` (float32, one per tensor)."""

    @abstractmethod
    def decode(self, streams: Streams, params: Params,
               entries: list[TensorEntry]) -> list[np.ndarray]:
        """One float32 vector of ``entry.count`` values per entry."""

    @staticmethod
    def from_params(params: Params, model_size: int) -> ValueCoding:
        """The coding an upload's params name; ``block`` may not exceed ``model_size``
        (the model's element count), so no block asks for more than the model holds."""
        if "bits" not in params:
            return Float32Values()
        bits = param(params, "bits", int)
        block = param(params, "block", int)
        if bits not in CODEC_BITS:
            raise UploadError(f"codec parameter 'bits' is {bits}, supported: {CODEC_BITS}")
        if not 0 <= block <= model_size:
            raise UploadError(f"codec parameter 'block' is {block}, must be in [0, "
                              f"{model_size}] (0 = one block per tensor)")
        return QuantizedValues(bits, block, rng=None)


class Float32Values(ValueCoding):
    streams = frozenset({"values"})

    def encode(self, vectors):
        flat = np.concatenate(vectors) if vectors else np.zeros(0)
        return {"values": flat.astype(np.float32)}, {}

    def decode(self, streams, params, entries):
        values = take_stream(streams, "values", np.float32)
        expected = sum(e.count for e in entries)
        if values.size != expected:
            raise UploadError(f"stream 'values' holds {values.size} values, the tensor table "
                              f"declares {expected}")
        return np.split(values, np.cumsum([e.count for e in entries])[:-1]) if entries else []


class QuantizedValues(ValueCoding):
    streams = frozenset({"levels", "scales"})

    def __init__(self, bits: int, block: int, rng: np.random.Generator | None):
        self.bits = bits
        self.block = block
        self.rng = rng

    def encode(self, vectors):
        if self.rng is None:
            raise RuntimeError("QuantizedValues built from an upload's params cannot encode")
        parts = [quantize(v, self.bits, self.rng, self.block) for v in vectors]
        levels = np.concatenate([p.levels for p in parts]) if parts else np.zeros(0, np.uint8)
        scales = np.concatenate([p.scales for p in parts]) if parts else np.zeros(0, np.float32)
        streams = {"levels": pack_levels(levels, self.bits), "scales": scales}
        return streams, {"bits": self.bits, "block": self.block}

    def decode(self, streams, params, entries):
        packed = take_stream(streams, "levels", np.uint8)
        scales = take_stream(streams, "scales", np.float32)
        total = sum(e.count for e in entries)
        if packed.size != packed_size(total, self.bits):
            raise UploadError(f"stream 'levels' has {packed.size} bytes, {total} "
                              f"{self.bits}-bit values take {packed_size(total, self.bits)}")
        blocks = [num_blocks(e.count, self.block) for e in entries]
        if scales.size != sum(blocks):
            raise UploadError(f"stream 'scales' holds {scales.size} scales, the tensor table "
                              f"needs {sum(blocks)}")
        levels = unpack_levels(packed, self.bits, total)
        vectors = []
        level_start = scale_start = 0
        for entry, count in zip(entries, blocks):
            tensor_scales = scales[scale_start:scale_start + count]
            if not np.isfinite(tensor_scales).all():
                raise UploadError(f"tensor '{entry.name}': a scale is NaN or Inf")
            if (tensor_scales < 0).any():
                raise UploadError(f"tensor '{entry.name}': a scale is negative")
            vectors.append(dequantize(Quantized(levels[level_start:level_start + entry.count],
                                                tensor_scales, self.bits, self.block)))
            level_start += entry.count
            scale_start += count
        return vectors
