"""Dense float32 upload: the uncompressed reference every other codec is measured against.

One stream per tensor, named after it, holding the tensor as is. Exact.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from sepal.codecs.base import Codec
from sepal.wire import UploadError


class DenseCodec(Codec):
    name = "dense"

    def encode_streams(self, update, state):
        streams = {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
        return streams, {}, state

    @classmethod
    def decode_streams(cls, streams, params, shapes):
        unknown = set(streams) - set(shapes)
        missing = set(shapes) - set(streams)
        if unknown:
            raise UploadError(f"tensor(s) not in the model: {sorted(unknown)[:3]}")
        if missing:
            raise UploadError(f"tensor(s) missing from the upload: {sorted(missing)[:3]}")
        decoded = OrderedDict()
        for name, shape in shapes.items():
            array = streams[name]
            if array.dtype != np.float32:
                raise UploadError(f"tensor '{name}' has dtype {array.dtype}, expected float32")
            if tuple(array.shape) != tuple(shape):
                raise UploadError(
                    f"tensor '{name}' has shape {tuple(array.shape)}, expected {tuple(shape)}"
                )
            decoded[name] = array
        return decoded
