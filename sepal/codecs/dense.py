"""Dense float32 upload: the uncompressed reference every other codec is measured against."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord

from sepal.codecs.base import Codec, CodecState
from sepal.wire import WIRE_VERSION, UploadError, arrays_to_record


class DenseCodec(Codec):
    name = "dense"

    def encode(self, update, state: CodecState | None):
        payload = arrays_to_record(
            OrderedDict((k, np.asarray(v, dtype=np.float32)) for k, v in update.items())
        )
        return payload, ConfigRecord({"wire-version": WIRE_VERSION, "codec": self.name}), state

    def decode(self, payload, params, shapes):
        missing = set(shapes) - set(payload.keys())
        unknown = set(payload.keys()) - set(shapes)
        if unknown:
            raise UploadError(f"tensor(s) not in the model: {sorted(unknown)[:3]}")
        if missing:
            raise UploadError(f"tensor(s) missing from the upload: {sorted(missing)[:3]}")
        decoded = OrderedDict()
        for name, shape in shapes.items():
            array = payload[name].numpy()
            if array.dtype != np.float32:
                raise UploadError(f"tensor '{name}' has dtype {array.dtype}, expected float32")
            if tuple(array.shape) != tuple(shape):
                raise UploadError(
                    f"tensor '{name}' has shape {tuple(array.shape)}, expected {tuple(shape)}"
                )
            decoded[name] = array
        return decoded
