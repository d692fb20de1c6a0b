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

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

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
    """Bytes of ``content`` as Flower serializes it onto the wire (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def record_to_arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((key, array.numpy()) for key, array in record.items())


def check_wire_version(codec_config: ConfigRecord) -> None:
    version = codec_config.get("wire-version")
    if version != WIRE_VERSION:
        raise UploadError(
            f"wire-version {version!r} is not supported (this server speaks {WIRE_VERSION}); "
            "upgrade the older peer"
        )
