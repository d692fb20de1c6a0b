"""Wire format of the messages between the ServerApp and the ClientApps.

Train instruction (server -> client), a ``RecordDict``:
    ``arrays``  ArrayRecord  the global exchanged parameters (name -> tensor)
    ``config``  ConfigRecord round settings (``server-round``, ``upload-codec``, ...)
With a compressed downlink, ``arrays`` may give way to deltas against the model the
client already holds (``download``, ``download-delta-{i}``, ``download-codec-{i}``;
see :mod:`sepal.codecs.downlink`).

Train reply (client -> server):
    ``update``  ArrayRecord  the codec's payload for ``local - global``
    ``codec``   ConfigRecord ``wire-version``, ``codec`` and the codec's parameters
    ``metrics`` MetricRecord ``num-examples``, ``train-loss``, ``train-accuracy``, ...
    ``privacy`` ConfigRecord (DP-SGD clients) cumulative ``epsilon`` at ``delta``, ...
A client that refuses to train (its privacy budget) replies ``refusal`` (ConfigRecord
``code``, ``reason``) and ``privacy`` instead of ``update``/``codec``/``metrics``.

The server decodes every upload before a strategy sees it and hands the strategy a
reply of Flower's usual shape (``arrays`` = global + update, ``metrics``), so every
``flwr.serverapp.strategy`` aggregates it unchanged. ``wire-version`` makes peers of
different versions fail loudly instead of misreading each other.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
from flwr.common.serde import recorddict_to_proto
from flwr.proto.recorddict_pb2 import Array as ProtoArray
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

# 2: compressed codecs (topk, quantized, lossless pass) and compressed downlink deltas.
WIRE_VERSION = 2

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
CODEC_KEY = "codec"
METRICS_KEY = "metrics"
NUM_EXAMPLES = "num-examples"
PRIVACY_KEY = "privacy"
REFUSAL_KEY = "refusal"


class UploadError(ValueError):
    """An upload that cannot be decoded or fails validation; names the defect."""


def serialized_size(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serializes it onto the wire (protobuf).

    Computed without a protobuf copy of the array data (which would cost twice the
    upload's size for a moment): every record but the arrays' ``data`` is sized by
    protobuf itself, and each ``data`` field and the length prefixes around it are added
    by protobuf's encoding rules (a length-delimited field is its tag, the varint of its
    length, then the bytes).
    """
    total = 0
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = sum(_delimited(_ARRAY_ITEM_FIELD, _array_item_size(name, array))
                         for name, array in record.items())
            item = ProtoRecordDict.Item(key=key).ByteSize() + _delimited(_ARRAY_RECORD_FIELD,
                                                                         arrays)
        else:
            item = recorddict_to_proto(RecordDict({key: record})).items[0].ByteSize()
        total += _delimited(_ITEMS_FIELD, item)
    return total


_ITEMS_FIELD = ProtoRecordDict.DESCRIPTOR.fields_by_name["items"].number
_ARRAY_RECORD_FIELD = ProtoRecordDict.Item.DESCRIPTOR.fields_by_name["array_record"].number
_ARRAY_ITEM_FIELD = ProtoArrayRecord.DESCRIPTOR.fields_by_name["items"].number
_ARRAY_VALUE_FIELD = ProtoArrayRecord.Item.DESCRIPTOR.fields_by_name["value"].number
_DATA_FIELD = ProtoArray.DESCRIPTOR.fields_by_name["data"].number


def _array_item_size(name: str, array: Array) -> int:
    hollow = ProtoArray(dtype=array.dtype, shape=array.shape, stype=array.stype).ByteSize()
    data = _delimited(_DATA_FIELD, len(array.data)) if array.data else 0  # proto3 omits b""
    return (ProtoArrayRecord.Item(key=name).ByteSize()
            + _delimited(_ARRAY_VALUE_FIELD, hollow + data))


def _delimited(field: int, length: int) -> int:
    return _varint_size(field << 3) + _varint_size(length) + length


def _varint_size(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def record_to_arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((key, array.numpy()) for key, array in record.items())


def npy_array(array: np.ndarray) -> Array:
    """``Array(array)`` with one copy of the data instead of ``np.save``'s two."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = b"".join((header.getvalue(), array.reshape(-1).view(np.uint8)))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=SType.NUMPY, data=data)


def read_array(array: Array, what: str) -> np.ndarray:
    """The numpy array a received ``Array`` holds, read-only; UploadError naming ``what``.

    Unlike ``Array.numpy()`` (``np.load``), the ``.npy`` header is checked against the
    bytes actually received before anything is allocated, so a header claiming 10^12
    elements costs nothing.
    """
    if not isinstance(array, Array):
        raise UploadError(f"{what} is a {type(array).__name__}, not an Array")
    if array.stype != SType.NUMPY:
        raise UploadError(f"{what} has serialization type {array.stype!r}, expected "
                          f"{SType.NUMPY!r}")
    return load_npy(array.data, what)


def load_npy(data: bytes, what: str) -> np.ndarray:
    """Parse ``.npy`` bytes without pickle, checking the header against the data size."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"npy format version {version}")
    except (ValueError, TypeError, SyntaxError, EOFError, OverflowError) as err:
        raise UploadError(f"{what} is not a readable .npy array ({err})") from err
    if dtype.hasobject or dtype.itemsize == 0 or dtype.fields is not None:
        raise UploadError(f"{what} has dtype {dtype}, expected plain numbers")
    count = math.prod(shape)
    available = len(data) - buffer.tell()
    if count * dtype.itemsize != available:
        raise UploadError(f"{what} declares {count} x {dtype} ({count * dtype.itemsize} "
                          f"bytes) but carries {available} bytes")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def check_wire_version(codec_config: ConfigRecord) -> None:
    version = codec_config.get("wire-version")
    if version != WIRE_VERSION:
        raise UploadError(
            f"wire-version {version!r} is not supported (this server speaks {WIRE_VERSION}); "
            "upgrade the older peer"
        )
