"""Compressed downlink: the global model travels as deltas against a shared reference.

Server and clients keep the same *reference* model ``r``. Each round the server
encodes the delta between the true global model ``w_t`` and the reference with the
``download-codec`` chain, and both sides add the *decoded* delta to their reference:

    d_t = C(w_t - r_{t-1}),     r_t = r_{t-1} + D(d_t)     (version t)

so a client's reference is bit-for-bit the server's. Clients train from ``r_t``; the
server adds their updates to ``w_t``, and whatever a lossy delta left out is still in
``w_{t+1} - r_t`` and goes out with the next delta (error feedback for free).

Clients that skipped rounds: the server remembers which version each node holds
(the one it was sent in the last round it answered) and keeps the recent deltas, so a
node that sat out rounds gets the chain of deltas since its version, one after the
other in the same message. A node it knows nothing about (first round, a failure, a
node that joined late), or whose chain would be larger than the model, gets the full
reference as float32 ``arrays`` instead. The server keeps deltas only as long as
their sizes add up to less than the model's, which bounds its memory.

Train instruction records, besides the strategy's ``config``:
    ``download``            ConfigRecord ``wire-version``, ``lineage`` (random per server
                            run), ``version``, ``base`` (-1: full reference in ``arrays``),
                            ``deltas`` (how many)
    ``download-delta-{i}``  ArrayRecord  codec payload of delta i (oldest first)
    ``download-codec-{i}``  ConfigRecord its codec params
A client that does not hold ``base`` of ``lineage`` raises :class:`DownloadError`
(reported to the server as a failed round for that node, which then sends it the
full reference): never a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import OrderedDict
from collections.abc import Collection

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from sepal.codecs.base import Codec
from sepal.codecs.chain import build_codec, decode_upload, parse_chain
from sepal.codecs.config import CompressionConfig
from sepal.wire import (
    ARRAYS_KEY,
    WIRE_VERSION,
    UploadError,
    arrays_to_record,
    record_to_arrays,
    serialized_size,
)

DOWNLOAD_KEY = "download"
REFERENCE_KEY = "download-reference"       # in the client's context.state
REFERENCE_INFO_KEY = "download-reference-info"


class DownloadError(ValueError):
    """A client cannot rebuild the global model from the train instruction."""


def delta_keys(index: int) -> tuple[str, str]:
    return f"download-delta-{index}", f"download-codec-{index}"


@dataclasses.dataclass(frozen=True)
class Delta:
    base: int
    version: int
    payload: ArrayRecord
    params: ConfigRecord
    size: int  # serialized bytes of payload + params


class DownlinkBroadcaster:
    """Server side: keeps the reference, the recent deltas and what each node holds."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.lineage = secrets.token_hex(8)
        self.reference: OrderedDict[str, np.ndarray] | None = None
        self.version = -1
        self.deltas: list[Delta] = []
        self.held: dict[int, int] = {}  # node id -> reference version it holds

    def advance(self, weights: OrderedDict[str, np.ndarray], version: int) -> None:
        """Move the reference towards ``weights``; the result is ``version``."""
        if self.reference is None:
            self.reference = OrderedDict((k, np.array(v, np.float32)) for k, v in weights.items())
        else:
            shapes = {k: v.shape for k, v in self.reference.items()}
            delta = OrderedDict((k, weights[k] - self.reference[k]) for k in self.reference)
            payload, params, _ = self.codec.encode(delta, None)
            sent = decode_upload(payload, params, shapes)
            self.reference = OrderedDict((k, np.add(v, sent[k], dtype=np.float32))
                                         for k, v in self.reference.items())
            size = serialized_size(RecordDict({"p": payload, "c": params}))
            self.deltas.append(Delta(self.version, version, payload, params, size))
        self.version = version
        self._forget_old_deltas()

    def address(self, messages: list[Message], arrays_key: str = ARRAYS_KEY) -> list[Message]:
        """Replace each message's global ``arrays`` with what its node needs."""
        full: ArrayRecord | None = None
        for message in messages:
            chain = self.chain_from(self.held.get(message.metadata.dst_node_id))
            content = RecordDict({k: v for k, v in message.content.items() if k != arrays_key})
            if chain is None:
                if full is None:
                    full = arrays_to_record(self.reference)
                content[arrays_key] = full
            else:
                for index, delta in enumerate(chain):
                    payload_key, params_key = delta_keys(index)
                    content[payload_key] = delta.payload
                    content[params_key] = delta.params
            content[DOWNLOAD_KEY] = ConfigRecord({
                "wire-version": WIRE_VERSION, "lineage": self.lineage, "version": self.version,
                "base": -1 if chain is None else chain[0].base if chain else self.version,
                "deltas": 0 if chain is None else len(chain),
            })
            message.content = content
        return messages

    def chain_from(self, base: int | None) -> list[Delta] | None:
        """The deltas from version ``base`` to the current one; None: send it all."""
        if base is None:
            return None
        chain = [d for d in self.deltas if d.version > base]
        if chain and chain[0].base != base or not chain and base != self.version:
            return None
        return chain

    def settle(self, sent_to: Collection[int], failed: Collection[int]) -> None:
        """After the round: nodes that answered hold the current version."""
        for node in sent_to:
            if node in failed:
                self.held.pop(node, None)
            else:
                self.held[node] = self.version

    def full_size(self) -> int:
        return sum(v.size for v in self.reference.values()) * 4 if self.reference else 0

    def _forget_old_deltas(self) -> None:
        budget = self.full_size()
        kept: list[Delta] = []
        for delta in reversed(self.deltas):
            budget -= delta.size
            if budget < 0:
                break
            kept.append(delta)
        self.deltas = kept[::-1]


def downlink_for(config: CompressionConfig) -> DownlinkBroadcaster | None:
    """The server's broadcaster when ``download-codec`` compresses, else None (dense)."""
    if not config.downlink_compressed:
        return None
    return DownlinkBroadcaster(build_codec(parse_chain(config.download_codec, "download-codec")))


def receive_global(content: RecordDict, state: RecordDict) -> OrderedDict[str, np.ndarray]:
    """Client side: the global model to train from, rebuilt from the train instruction.

    Without ``download`` the instruction carries the model itself (dense downlink).
    Otherwise the reference kept in ``state`` is brought up to the sent version.
    """
    if DOWNLOAD_KEY not in content:
        return record_to_arrays(content[ARRAYS_KEY])
    info = content[DOWNLOAD_KEY]
    if info.get("wire-version") != WIRE_VERSION:
        raise DownloadError(f"the server speaks wire-version {info.get('wire-version')!r}, "
                            f"this client {WIRE_VERSION}; upgrade the older peer")
    base = int(info["base"])
    if base < 0:
        reference = record_to_arrays(content[ARRAYS_KEY])
    else:
        reference = _held_reference(state, str(info["lineage"]), base)
        shapes = {k: v.shape for k, v in reference.items()}
        for index in range(int(info["deltas"])):
            payload_key, params_key = delta_keys(index)
            try:
                delta = decode_upload(content[payload_key], content[params_key], shapes)
            except UploadError as err:
                raise DownloadError(f"delta {index} of the global model: {err}") from err
            reference = OrderedDict((k, np.add(v, delta[k], dtype=np.float32))
                                    for k, v in reference.items())
    state[REFERENCE_KEY] = arrays_to_record(reference)
    state[REFERENCE_INFO_KEY] = ConfigRecord({"lineage": str(info["lineage"]),
                                              "version": int(info["version"])})
    return reference


def _held_reference(state: RecordDict, lineage: str, base: int) -> OrderedDict[str, np.ndarray]:
    held = state[REFERENCE_INFO_KEY] if REFERENCE_INFO_KEY in state else None
    if held is None or held["lineage"] != lineage or held["version"] != base:
        holding = (f"version {held['version']} of lineage {held['lineage']}" if held is not None
                   else "no reference")
        raise DownloadError(f"the server sent deltas from version {base} of lineage {lineage}, "
                            f"but this node holds {holding}")
    return record_to_arrays(state[REFERENCE_KEY])
