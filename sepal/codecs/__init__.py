"""Update codecs: how a client's update (local - global) is encoded for upload.

A codec turns ``{name: float32 array}`` into an ArrayRecord payload plus the
ConfigRecord of parameters needed to decode it, and back. Decoding checks the
payload against the model's parameter shapes and raises :class:`UploadError`
naming the defect.
"""

from __future__ import annotations

from sepal.codecs.base import Codec, CodecState
from sepal.codecs.dense import DenseCodec

__all__ = ["Codec", "CodecState", "DenseCodec", "build_codec", "decode_upload"]


def build_codec(spec: str) -> Codec:
    """The codec named by the run config's ``upload-codec`` setting."""
    if spec in ("", "dense"):
        return DenseCodec()
    from sepal.config import ConfigError

    raise ConfigError(f"run config 'upload-codec': unknown codec {spec!r} (known: 'dense')")


def decode_upload(payload, codec_config, shapes):
    """Decode an upload produced by any known codec; the codec is read from the upload."""
    from sepal.wire import UploadError, check_wire_version

    check_wire_version(codec_config)
    name = codec_config.get("codec")
    if name != DenseCodec.name:
        raise UploadError(f"unknown codec {name!r}")
    return DenseCodec().decode(payload, codec_config, shapes)
