"""Turn clients' encoded uploads into the replies Flower's strategies expect.

Runs before any strategy sees an update: decode with the codec named in the upload,
validate it (``server/validation.py``: names, shapes, dtype, finite values, norm),
and rebuild ``arrays = global + update`` so that every ``flwr.serverapp.strategy``
aggregates unchanged. A defective upload is logged with the client and the defect
and left out; the others go on. Accepted replies are ordered by node id, so the
aggregate does not depend on the order in which replies arrived (floating-point
sums do), which keeps a resumed run identical to an uninterrupted one.

:func:`decode_replies` reads a whole round for strategies that read every update;
``server/streaming.py`` reads one reply at a time with the same :func:`read_reply`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from sepal import wire
from sepal.codecs import decode_upload
from sepal.privacy.refusal import Refusal, read_reply_privacy
from server.validation import UpdateValidator

log = logging.getLogger("sepal.server")
T = TypeVar("T")
# Metric of a reply standing for several clients (an aggregate): how many.
CLIENTS_KEY = "aggregated-clients"


@dataclasses.dataclass
class DecodedRound:
    accepted: list[Message]           # strategy-shaped replies (arrays + metrics)
    rejected: dict[int, str]          # node id -> reason
    failed: dict[int, str]            # node id -> error the client reported
    bytes_up: dict[int, int]          # node id -> serialized reply size
    timed_out: list[int] = dataclasses.field(default_factory=list)  # no reply in time
    refused: dict[int, Refusal] = dataclasses.field(default_factory=dict)  # privacy budget
    privacy: dict[int, ConfigRecord] = dataclasses.field(default_factory=dict)  # ε reports
    # Clients behind ``accepted`` when a reply stands for several (secure and streaming
    # aggregation send one pre-summed reply); None: one reply per client.
    contributors: int | None = None
    # One accepted client's metrics (the keys all share), to size the dense upload baseline
    # with; None: those of ``accepted[0]``.
    client_metrics: MetricRecord | None = None
    aggregate_refused: str = ""  # why the accepted updates cannot be aggregated ("" if they can)
    out_of_bounds: int = 0  # updates over the norm limit (streaming: judged at the close)
    summary: dict = dataclasses.field(default_factory=dict)  # extra fields of the round record

    @property
    def clients(self) -> int:
        return len(self.accepted) if self.contributors is None else self.contributors


def decode_replies(replies: list[Message], global_arrays: OrderedDict[str, np.ndarray],
                   arrays_key: str = wire.ARRAYS_KEY,
                   instruction_nodes: dict[str, int] | None = None,
                   validator: UpdateValidator | None = None) -> DecodedRound:
    """``instruction_nodes`` (message id -> node id) names the node of an error reply
    the SuperLink wrote itself ("Node Unavailable"), whose sender is the SuperLink.

    Whatever fails while reading one reply (a defect the decoder names, or any other
    exception, MemoryError included) rejects that reply alone; the round goes on.
    """
    validator = validator or UpdateValidator()

    def check_and_rebuild(update: OrderedDict[str, np.ndarray]):
        validator.check(update, global_arrays)
        return update, _full_record(global_arrays, update)

    result = DecodedRound([], {}, {}, {})
    decoded: dict[int, tuple[Message, ArrayRecord, MetricRecord, OrderedDict]] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        read = read_reply(reply, result, global_arrays, instruction_nodes,
                          validator.cfg.max_site_examples, check_and_rebuild)
        if read is not None:
            node, (update, full), metrics = read
            decoded[node] = (reply, full, metrics, update)
    too_long = validator.check_norms({node: entry[3] for node, entry in decoded.items()})
    kept = {node: entry for node, entry in decoded.items() if node not in too_long}
    for node in too_long:
        reject(result, node, too_long[node])
    shared = shared_metric_keys([metrics for _, _, metrics, _ in kept.values()])
    for reply, full, metrics, _ in kept.values():
        metrics = MetricRecord({key: metrics[key] for key in metrics if key in shared})
        content = RecordDict({arrays_key: full, wire.METRICS_KEY: metrics})
        result.accepted.append(Message(content=content, metadata=reply.metadata))
    return result


def read_reply(reply: Message, result: DecodedRound, global_arrays: OrderedDict[str, np.ndarray],
               instruction_nodes: dict[str, int] | None, max_examples: int,
               accept: Callable[[OrderedDict[str, np.ndarray]], T],
               ) -> tuple[int, T, MetricRecord] | None:
    """Read one reply into ``result``'s accounting (failed, refused, rejected, bytes up,
    privacy reports); for a decoded update that ``accept`` takes without raising, return
    (node, what ``accept`` returned, metrics). ``accept`` raises UploadError (or anything
    else) to reject the update."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        node = (instruction_nodes or {}).get(reply.metadata.reply_to_message_id, node)
        result.failed[node] = str(reply.error.reason)
        log.warning("client %d failed this round: %s", node, reply.error.reason)
        return None
    try:
        result.bytes_up[node] = wire.serialized_size(reply.content)
        report, refusal = read_reply_privacy(reply.content)
        if refusal is not None:
            if report is not None:
                result.privacy[node] = report
            result.refused[node] = refusal
            return None
        shapes = {name: array.shape for name, array in global_arrays.items()}
        update, metrics = _decode_one(reply.content, shapes, max_examples)
        accepted = accept(update)
    except wire.UploadError as err:
        reject(result, node, str(err))
        return None
    except Exception as err:  # noqa: BLE001  any failure on one reply rejects that reply
        reject(result, node, f"unreadable reply ({type(err).__name__}: {err})")
        return None
    if report is not None:
        result.privacy[node] = report
    return node, accepted, metrics


def aggregate_reply(arrays_key: str, arrays: OrderedDict[str, np.ndarray], metrics: MetricRecord,
                    instructions: list[Message]) -> Message:
    """One reply shaped like a client's, standing for several clients' aggregate."""
    content = RecordDict({arrays_key: wire.arrays_to_record(arrays), wire.METRICS_KEY: metrics})
    first = instructions[0].metadata
    return Message(content=content, metadata=Metadata(
        run_id=first.run_id, message_id="", src_node_id=0, dst_node_id=first.src_node_id,
        reply_to_message_id="", group_id=first.group_id, created_at=time.time(),
        ttl=first.ttl, message_type=first.message_type))


def reject(result: DecodedRound, node: int, defect: str) -> None:
    result.rejected[node] = defect
    log.warning("upload from client %d rejected: %s", node, defect)


def _decode_one(content: RecordDict, shapes, max_examples: int):
    for key, kind in ((wire.UPDATE_KEY, ArrayRecord), (wire.CODEC_KEY, ConfigRecord),
                      (wire.METRICS_KEY, MetricRecord)):
        if key not in content:
            raise wire.UploadError(f"record '{key}' missing from the upload")
        if not isinstance(content[key], kind):
            raise wire.UploadError(f"record '{key}' is a {type(content[key]).__name__}, "
                                   f"expected a {kind.__name__}")
    metrics = content[wire.METRICS_KEY]
    examples = metrics.get(wire.NUM_EXAMPLES)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
        raise wire.UploadError(f"'{wire.NUM_EXAMPLES}' must be a positive integer, got "
                               f"{examples!r}")
    if examples > max_examples:
        raise wire.UploadError(f"'{wire.NUM_EXAMPLES}' is {examples}, more than "
                               f"max-site-examples {max_examples}")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise wire.UploadError(f"metric '{key}' must be a finite number, got {value!r}")
    update = decode_upload(content[wire.UPDATE_KEY], content[wire.CODEC_KEY], shapes)
    return update, metrics


def _full_record(global_arrays: OrderedDict[str, np.ndarray],
                 update: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    """``global + update`` as the strategy's ArrayRecord, one tensor at a time (so at most
    one tensor's sum is held besides the record); UploadError if a sum leaves float32's
    range, as a finite update of 3.4e38 makes it."""
    arrays = OrderedDict()
    with np.errstate(over="ignore", invalid="ignore"):
        for name, array in global_arrays.items():
            full = np.ascontiguousarray(array + update[name])
            if not np.isfinite(full).all():
                raise wire.UploadError(f"tensor '{name}': global model + update is not finite")
            arrays[name] = wire.npy_array(full)
            del full
    return ArrayRecord(arrays)


def shared_metric_keys(records: list[MetricRecord]) -> set[str]:
    """Metric keys every accepted reply carries: Flower's aggregation needs the same keys
    in all of them, so one reply's extra key cannot fail the round."""
    if not records:
        return set()
    return set.intersection(*(set(r.keys()) for r in records))
