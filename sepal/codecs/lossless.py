"""A lossless pass over another codec's streams (zlib, lzma, or zstd when available).

Each stream is saved in numpy's ``.npy`` format (dtype and shape included) and
compressed into a uint8 stream of the same name. Params: ``lossless`` (the method),
``lossless-streams`` and ``lossless-sizes`` (each stream's uncompressed size).
Decompression never produces more than the declared size, and the declared sizes
together may not exceed what the model's size allows, so a small upload cannot
expand into a huge one; the lzma decoder's own memory is capped (``LZMA_MEMLIMIT``),
whatever dictionary size a stream's header asks for.

zlib and lzma come with Python; zstd is offered where Python has ``compression.zstd``
(3.14 and later), whose streaming API is the same as lzma's.
"""

from __future__ import annotations

import importlib
import io
import lzma
import math
import zlib

import numpy as np

from sepal.codecs.base import Codec, int_list, param, take_stream
from sepal.wire import UploadError, load_npy

METHODS = ("zlib", "lzma", "zstd")
# The decoder's dictionary is the size the stream's header asks for (up to 1.5 GiB);
# preset 6, which the encoder uses, needs about 9 MiB.
LZMA_MEMLIMIT = 16 << 20


def zstd_module():
    """Python's own zstd (3.14+), or None."""
    try:
        return importlib.import_module("compression.zstd")
    except ImportError:
        return None


def available_methods() -> tuple[str, ...]:
    return tuple(m for m in METHODS if m != "zstd" or zstd_module() is not None)


class Lossless(Codec):
    def __init__(self, inner: Codec, method: str):
        self.inner = inner
        self.method = method
        self.name = inner.name

    def encode_streams(self, update, state):
        streams, params, new_state = self.inner.encode_streams(update, state)
        packed, sizes = {}, []
        for key, array in streams.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            raw = buffer.getvalue()
            sizes.append(len(raw))
            packed[key] = np.frombuffer(_compress(self.method, raw), dtype=np.uint8)
        params = {**params, "lossless": self.method, "lossless-streams": list(streams),
                  "lossless-sizes": sizes}
        return packed, params, new_state

    def decode_streams(self, streams, params, shapes):
        return self.inner.decode_streams(decompress_streams(streams, params, shapes), params,
                                         shapes)


def decompress_streams(streams, params, shapes):
    method = param(params, "lossless", str)
    if method not in available_methods():
        raise UploadError(f"lossless method {method!r} is not available here "
                          f"(available: {available_methods()})")
    names = params.get("lossless-streams")
    sizes = int_list(params, "lossless-sizes")
    if not isinstance(names, list) or len(names) != len(sizes) or set(names) != set(streams):
        raise UploadError(f"'lossless-streams' {names!r} does not list the upload's streams "
                          f"{sorted(streams)} with one size each")
    limit = 12 * sum(math.prod(s) for s in shapes.values()) + 1024 * (len(shapes) + len(names))
    if any(s < 0 for s in sizes) or sum(sizes) > limit:
        raise UploadError(f"declared uncompressed sizes {sum(sizes)} bytes exceed what this "
                          f"model allows ({limit})")
    result = {}
    for key, size in zip(names, sizes):
        raw = _decompress(method, take_stream(streams, key, np.uint8).tobytes(), size, key)
        result[key] = load_npy(raw, f"stream '{key}' (decompressed)")
    return result


def _compress(method: str, raw: bytes) -> bytes:
    if method == "zlib":
        return zlib.compress(raw, 9)
    if method == "lzma":
        return lzma.compress(raw, preset=6)
    return zstd_module().compress(raw, level=19)


def _decompress(method: str, data: bytes, size: int, key: str) -> bytes:
    """Decompress at most ``size + 1`` bytes; UploadError unless exactly ``size`` come out."""
    try:
        if method == "zlib":
            decompressor = zlib.decompressobj()
            raw = decompressor.decompress(data, size + 1)
            complete = decompressor.eof
        else:
            decompressor = (lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT) if method == "lzma"
                            else zstd_module().ZstdDecompressor())
            raw = decompressor.decompress(data, size + 1)
            complete = decompressor.eof
    except _decompression_errors() as err:
        raise UploadError(f"stream '{key}' does not decompress with {method} ({err})") from err
    if len(raw) != size or not complete:
        raise UploadError(f"stream '{key}' decompresses to {'more than ' if len(raw) > size else ''}"
                          f"{len(raw)} bytes{'' if complete else ' (incomplete)'}, "
                          f"declared {size}")
    return raw



def _decompression_errors() -> tuple[type[Exception], ...]:
    zstd = zstd_module()
    return (zlib.error, lzma.LZMAError, ValueError, EOFError) + ((zstd.ZstdError,) if zstd else ())
