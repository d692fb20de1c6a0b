"""Update codecs: how a client's update (local - global) travels, and the global model back.

Written here: Flower ships no update compression, and no maintained library encodes sparse
or quantized updates as Flower records with the checks untrusted uploads need.

A codec turns ``{name: float32 array}`` into an ArrayRecord payload plus the
ConfigRecord of parameters needed to decode it, and back. Decoding checks the
payload against the model's parameter shapes and raises :class:`UploadError`
naming the defect. One codec per module: ``dense``, ``dense_quantized``, ``topk``, and
the wrappers ``error_feedback`` and ``lossless``; ``chain`` builds them from the run
config; ``stochastic_quantization`` is the quantizer on its own (no wire format);
``downlink`` sends the global model as compressed deltas.
"""

from __future__ import annotations

from sepal.codecs.base import Codec, CodecState
from sepal.codecs.chain import ChainSpec, build_codec, decode_upload, parse_chain
from sepal.codecs.config import CompressionConfig
from sepal.codecs.dense import DenseCodec

__all__ = ["ChainSpec", "Codec", "CodecState", "CompressionConfig", "DenseCodec", "build_codec",
           "decode_upload", "parse_chain"]
