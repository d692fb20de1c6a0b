"""Codec chains from the run config, and decoding any upload from its own params.

A chain is written as comma-separated stages, e.g. ``"topk:0.01,ef,q4,zlib"``:

``dense``               float32, uncompressed (the default; alone or with a lossless pass)
``topk:K[:SCOPE[:WHOLE]]`` keep the K largest-magnitude entries: ``0 < K < 1`` a
                        fraction, ``K >= 1`` a count; SCOPE ``global`` (default) or
                        ``tensor``; tensors of at most WHOLE elements (default 0) go whole
``qB[:BLOCK]``          stochastic quantization to B = 8, 4 or 2 bits, one scale per
                        BLOCK values (default 256; 0 = one scale per tensor)
``ef``                  error feedback: keep what was not sent, add it next round
``zlib|lzma|zstd``      a lossless pass over the encoded streams

The pipeline order is fixed whatever the order written: error feedback wraps
top-k, whose kept values (or, without top-k, all values) are quantized, and the
lossless pass compresses the result.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from sepal.codecs.base import Codec, Shapes, param, read_streams
from sepal.codecs.dense import DenseCodec
from sepal.codecs.error_feedback import ErrorFeedback
from sepal.codecs.lossless import METHODS, Lossless, available_methods, decompress_streams
from sepal.codecs.dense_quantized import QuantizedCodec
from sepal.codecs.topk import SCOPES, TopKCodec
from sepal.codecs.values import CODEC_BITS, Float32Values, QuantizedValues
from sepal.config import ConfigError
from sepal.wire import UploadError, check_wire_version

DEFAULT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    topk: float = 0.0          # 0 = off; < 1 a fraction, >= 1 a count
    topk_scope: str = "global"
    topk_whole_below: int = 0  # tensors of at most this many elements are sent whole
    bits: int = 0              # 0 = float32 values
    block: int = DEFAULT_BLOCK
    error_feedback: bool = False
    lossless: str = ""

    @property
    def lossy(self) -> bool:
        return self.topk > 0 or self.bits > 0


def parse_chain(text: str, key: str = "upload-codec") -> ChainSpec:
    """Parse a chain; ConfigError naming ``key`` and the bad stage if it is not valid."""
    fields: dict = {}
    seen: set[str] = set()
    for stage in (s.strip() for s in text.split(",")):
        name, _, rest = stage.partition(":")
        kind = "q" if name[:1] == "q" and _is_whole(name[1:]) else name
        role = "lossless" if kind in METHODS else kind
        if role in seen:
            raise ConfigError(f"run config '{key}': stage '{role}' appears twice in {text!r}")
        seen.add(role)
        if kind == "dense" and not rest:
            continue
        if kind == "topk":
            fields.update(_topk(rest, key))
        elif kind == "q":
            fields.update(_quantize(name, rest, key))
        elif kind == "ef" and not rest:
            fields["error_feedback"] = True
        elif kind in METHODS and not rest:
            if kind not in available_methods():
                raise ConfigError(f"run config '{key}': '{kind}' is not available in this "
                                  f"Python (available: {', '.join(available_methods())})")
            fields["lossless"] = kind
        else:
            raise ConfigError(
                f"run config '{key}': unknown stage {stage!r} in {text!r} (stages: dense, "
                "topk:K[:global|tensor[:WHOLE]], q8|q4|q2[:BLOCK], ef, zlib, lzma, zstd)")
    spec = ChainSpec(**fields)
    if "dense" in seen and spec.lossy:
        raise ConfigError(f"run config '{key}': 'dense' cannot be combined with topk or "
                          f"quantization in {text!r}")
    if spec.error_feedback and not spec.lossy:
        raise ConfigError(f"run config '{key}': 'ef' needs a lossy stage (topk or q*) to "
                          f"feed back, in {text!r}")
    return spec


def build_codec(spec: str | ChainSpec, rng: np.random.Generator | None = None) -> Codec:
    """The codec a chain describes; ``rng`` drives stochastic rounding (fresh if None)."""
    if isinstance(spec, str):
        spec = parse_chain(spec)
    values = (QuantizedValues(spec.bits, spec.block, rng or np.random.default_rng())
              if spec.bits else Float32Values())
    codec: Codec
    if spec.topk > 0:
        codec = TopKCodec(spec.topk, spec.topk_scope, values, spec.topk_whole_below)
    elif spec.bits:
        codec = QuantizedCodec(values)
    else:
        codec = DenseCodec()
    if spec.lossless:
        codec = Lossless(codec, spec.lossless)
    if spec.error_feedback:
        codec = ErrorFeedback(codec)
    return codec


FORMATS: dict[str, type[Codec]] = {
    DenseCodec.name: DenseCodec, QuantizedCodec.name: QuantizedCodec, TopKCodec.name: TopKCodec,
}


def decode_upload(payload: ArrayRecord, params: ConfigRecord, shapes: Shapes):
    """Decode an upload produced by any known codec; the codec is read from the upload.

    Every format decodes from its params alone (the receiver needs none of the
    sender's settings); a lossless pass is undone first.
    """
    check_wire_version(params)
    params = dict(params)
    name = param(params, "codec", str)
    if name not in FORMATS:
        raise UploadError(f"unknown codec {name!r} (known: {', '.join(sorted(FORMATS))})")
    streams = read_streams(payload)
    if "lossless" in params:
        streams = decompress_streams(streams, params, shapes)
    return FORMATS[name].decode_streams(streams, params, shapes)


def _topk(rest: str, key: str) -> dict:
    amount, _, rest = rest.partition(":")
    scope, _, whole = rest.partition(":")
    try:
        k = float(amount)
    except ValueError:
        k = -1.0
    if not math.isfinite(k) or not (0 < k < 1 or (k >= 1 and k == int(k))):
        raise ConfigError(f"run config '{key}': topk needs a fraction in (0, 1) or a whole "
                          f"count >= 1, got {amount!r}")
    scope = scope or "global"
    if scope not in SCOPES:
        raise ConfigError(f"run config '{key}': topk scope must be one of {SCOPES}, "
                          f"got {scope!r}")
    if whole and not _is_whole(whole):
        raise ConfigError(f"run config '{key}': the whole-tensor size of topk must be a whole "
                          f"number of elements >= 0, got {whole!r}")
    return {"topk": k, "topk_scope": scope, "topk_whole_below": int(whole or 0)}


def _quantize(name: str, rest: str, key: str) -> dict:
    bits = int(name[1:])
    if bits not in CODEC_BITS:
        raise ConfigError(f"run config '{key}': quantization to {bits} bits is not offered "
                          f"(q8, q4 or q2)")
    if not rest:
        return {"bits": bits}
    if not _is_whole(rest):
        raise ConfigError(f"run config '{key}': the block of '{name}' must be a whole number "
                          f">= 0 (0 = one scale per tensor), got {rest!r}")
    return {"bits": bits, "block": int(rest)}


def _is_whole(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` accepts '²' and other digits ``int`` refuses)."""
    return bool(re.fullmatch(r"[0-9]+", text))
