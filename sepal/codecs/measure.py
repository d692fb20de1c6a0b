"""Bytes on the wire against the dense float32 baseline, for the round metrics.

Both sides are measured, never estimated from shapes: the actual messages with
:func:`sepal.wire.serialized_size`, and the baseline by serializing the same message
as it would be with a dense float32 update (upload) or the full model (download).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict

from sepal import wire
from sepal.codecs.dense import DenseCodec


def dense_upload_size(weights: OrderedDict[str, np.ndarray], metrics: MetricRecord) -> int:
    """Serialized size of a train reply carrying a dense float32 update of ``weights``."""
    zeros = OrderedDict((k, np.zeros(v.shape, np.float32)) for k, v in weights.items())
    payload, params, _ = DenseCodec().encode(zeros, None)
    return wire.serialized_size(RecordDict({
        wire.UPDATE_KEY: payload, wire.CODEC_KEY: params, wire.METRICS_KEY: metrics}))


def transfer_metrics(bytes_up: dict[int, int], bytes_down: dict[int, int],
                     dense_up: int, dense_down: int) -> dict[str, Any]:
    """Dense baselines and compression factors (dense bytes / mean bytes per client)."""
    record: dict[str, Any] = {"bytes_up_dense_fp32": dense_up, "bytes_down_dense_fp32": dense_down}
    if bytes_up and dense_up:
        record["upload_compression"] = round(dense_up / np.mean(list(bytes_up.values())), 2)
    if bytes_down and dense_down:
        record["download_compression"] = round(dense_down / np.mean(list(bytes_down.values())), 2)
    return record
