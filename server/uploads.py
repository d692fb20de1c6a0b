"""Turn clients' encoded uploads into the replies Flower's strategies expect.

Runs before any strategy sees an update: decode with the codec named in the upload,
validate it (``server/validation.py``: names, shapes, dtype, finite values, norm),
and rebuild ``arrays = global + update`` so that every ``flwr.serverapp.strategy``
aggregates unchanged. A defective upload is logged with the client and the defect
and left out; the others go on. Accepted replies are ordered by node id, so the
aggregate does not depend on the order in which replies arrived (floating-point
sums do), which keeps a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from sepal import wire
from sepal.codecs import decode_upload
from sepal.privacy.refusal import Refusal, read_reply_privacy
from server.validation import UpdateValidator

log = logging.getLogger("sepal.server")


@dataclasses.dataclass
class DecodedRound:
    accepted: list[Message]           # strategy-shaped replies (arrays + metrics)
    updates: dict[int, OrderedDict]   # node id -> decoded update
    rejected: dict[int, str]          # node id -> reason
    failed: dict[int, str]            # node id -> error the client reported
    bytes_up: dict[int, int]          # node id -> serialized reply size
    timed_out: list[int] = dataclasses.field(default_factory=list)  # no reply in time
    refused: dict[int, Refusal] = dataclasses.field(default_factory=dict)  # privacy budget
    privacy: dict[int, ConfigRecord] = dataclasses.field(default_factory=dict)  # ε reports
    # Clients behind ``accepted`` when a reply stands for several (secure aggregation
    # sends one pre-summed reply); None: one reply per client.
    contributors: int | None = None
    summary: dict = dataclasses.field(default_factory=dict)  # extra fields of the round record

    @property
    def clients(self) -> int:
        return len(self.accepted) if self.contributors is None else self.contributors


def decode_replies(replies: list[Message], global_arrays: OrderedDict[str, np.ndarray],
                   arrays_key: str = wire.ARRAYS_KEY,
                   instruction_nodes: dict[str, int] | None = None,
                   validator: UpdateValidator | None = None) -> DecodedRound:
    """``instruction_nodes`` (message id -> node id) names the node of an error reply
    the SuperLink wrote itself ("Node Unavailable"), whose sender is the SuperLink."""
    validator = validator or UpdateValidator()
    shapes = {name: array.shape for name, array in global_arrays.items()}
    result = DecodedRound([], {}, {}, {}, {})
    decoded: dict[int, tuple[Message, OrderedDict, object]] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            node = (instruction_nodes or {}).get(reply.metadata.reply_to_message_id, node)
            result.failed[node] = reply.error.reason
            log.warning("client %d failed this round: %s", node, reply.error.reason)
            continue
        result.bytes_up[node] = wire.serialized_size(reply.content)
        try:
            report, refusal = read_reply_privacy(reply.content)
            if report is not None:
                result.privacy[node] = report
            if refusal is not None:
                result.refused[node] = refusal
                continue
            update, metrics = _decode_one(reply.content, shapes)
            validator.check(update, global_arrays)
        except wire.UploadError as err:
            _reject(result, node, str(err))
            continue
        decoded[node] = (reply, update, metrics)
    too_long = validator.check_norms({node: update for node, (_, update, _) in decoded.items()})
    for node, (reply, update, metrics) in decoded.items():
        if node in too_long:
            _reject(result, node, too_long[node])
            continue
        full = OrderedDict((k, global_arrays[k] + update[k]) for k in global_arrays)
        content = RecordDict({arrays_key: wire.arrays_to_record(full), wire.METRICS_KEY: metrics})
        result.accepted.append(Message(content=content, metadata=reply.metadata))
        result.updates[node] = update
    return result


def _reject(result: DecodedRound, node: int, defect: str) -> None:
    result.rejected[node] = defect
    log.warning("upload from client %d rejected: %s", node, defect)


def _decode_one(content: RecordDict, shapes):
    for key in (wire.UPDATE_KEY, wire.CODEC_KEY, wire.METRICS_KEY):
        if key not in content:
            raise wire.UploadError(f"record '{key}' missing from the upload")
    metrics = content[wire.METRICS_KEY]
    examples = metrics.get(wire.NUM_EXAMPLES)
    if not isinstance(examples, int) or examples <= 0:
        raise wire.UploadError(f"'{wire.NUM_EXAMPLES}' must be a positive integer, got {examples!r}")
    update = decode_upload(content[wire.UPDATE_KEY], content[wire.CODEC_KEY], shapes)
    return update, metrics
