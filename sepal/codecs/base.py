"""The codec interface.

A codec turns an update ``{tensor name: float32 array}`` into *streams* (named numpy
arrays, sent as one ArrayRecord) and *params* (scalars and lists, sent as one
ConfigRecord that also carries ``wire-version`` and the codec's name), and back.
Subclasses implement :meth:`encode_streams` and :meth:`decode_streams`; the record
conversion and the checks every upload gets live here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from sepal.wire import WIRE_VERSION, UploadError, arrays_to_record, read_array

# Per-client state a codec keeps between rounds (e.g. error-feedback residuals);
# the client stores it in its node's context.state so it survives fresh processes.
CodecState = ArrayRecord
Shapes = Mapping[str, tuple[int, ...]]
Streams = dict[str, np.ndarray]
Params = dict[str, Any]


class Codec(ABC):
    name: ClassVar[str]  # the ``codec`` value its uploads carry

    def encode(
        self, update: OrderedDict[str, np.ndarray], state: CodecState | None
    ) -> tuple[ArrayRecord, ConfigRecord, CodecState | None]:
        """Encode ``update``; return payload, decode parameters and the new state."""
        streams, params, new_state = self.encode_streams(update, state)
        record = ConfigRecord({"wire-version": WIRE_VERSION, "codec": self.name, **params})
        return arrays_to_record(streams), record, new_state

    def decode(self, payload: ArrayRecord, params: ConfigRecord,
               shapes: Shapes) -> OrderedDict[str, np.ndarray]:
        """Decode into float32 arrays of ``shapes``; raise UploadError on any defect."""
        return self.decode_streams(read_streams(payload), dict(params), shapes)

    @abstractmethod
    def encode_streams(self, update: OrderedDict[str, np.ndarray],
                       state: CodecState | None) -> tuple[Streams, Params, CodecState | None]:
        """The streams and params of ``update``, and the state for the next round."""

    @abstractmethod
    def decode_streams(self, streams: Streams, params: Params,
                       shapes: Shapes) -> OrderedDict[str, np.ndarray]:
        """The update the streams stand for; tensors it leaves out are zero."""


def read_streams(payload: ArrayRecord) -> Streams:
    if not isinstance(payload, ArrayRecord):
        raise UploadError(f"the upload's payload is a {type(payload).__name__}, expected an "
                          "ArrayRecord")
    return {key: read_array(array, f"stream '{key}'") for key, array in payload.items()}


def take_stream(streams: Streams, key: str, dtype: type) -> np.ndarray:
    """The 1-D stream ``key`` of ``dtype``; UploadError if missing or of another kind."""
    if key not in streams:
        raise UploadError(f"stream '{key}' missing from the upload")
    array = streams[key]
    if array.dtype != np.dtype(dtype) or array.ndim != 1:
        raise UploadError(f"stream '{key}' is {array.dtype}{list(array.shape)}, expected a "
                          f"1-D {np.dtype(dtype)} array")
    return array


def expect_streams(streams: Streams, expected: set[str]) -> None:
    unexpected = sorted(set(streams) - expected)
    if unexpected:
        raise UploadError(f"unexpected stream(s) {unexpected} in the upload "
                          f"(expected {sorted(expected)})")


def param(params: Params, key: str, kind: type) -> Any:
    """Parameter ``key`` of ``kind``; UploadError naming it if missing or mistyped."""
    value = params.get(key)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UploadError(f"codec parameter '{key}' is {value!r}, expected {kind.__name__}")
    return value


def int_list(params: Params, key: str) -> list[int]:
    value = params.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise UploadError(f"codec parameter '{key}' must be a list of integers")
    return value
