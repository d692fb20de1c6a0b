"""The messages of one SecAgg+ round and the checks both sides apply to them.

Written here: no maintained Python SecAgg+ implementation runs on Flower's Message API.

Five stages, each one message from the server to every remaining client and one
reply (message type ``train.<action>``, routed by ``@app.train(action)``):

=============  =========================================  ==============================
stage          server -> client                           client -> server
=============  =========================================  ==============================
setup          n and b                                    public keys (mask, envelope),
                                                          signed with the institution's key
share-keys     neighbours' signed public keys,            share envelopes, seed commitment
               threshold t
masked-input   global model + train config, envelopes     masked update (b-bit packed),
               addressed to the client                    senders whose envelope failed
consistency    the survivor set S (whose masked input     signature on S
               the server summed)
unmask         neighbours' signatures on S (or S itself   seed shares of the survivors,
               when unauthenticated)                      mask-key shares of the dropped
=============  =========================================  ==============================

The consistency stage runs in authenticated rounds (``secagg-authenticated``): a
client reveals shares only when at least t members of its neighbourhood signed the
same S, so a server cannot show different survivor sets to different holders.

Every message carries a header ``secagg`` = {run-id, server-round, round-id, stage};
``round-id`` is 16 random bytes drawn by the server per round. Both sides refuse a
message whose header does not match the round and stage they are in, and the same
values bind the share envelopes (AES-GCM associated data) and every derived key
(HKDF info), so a message replayed from another round or stage is detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from flwr.app import ConfigRecord, RecordDict

from sepal.secagg.errors import SecAggError

SETUP, SHARE_KEYS, MASKED_INPUT, UNMASK = "setup", "share-keys", "masked-input", "unmask"
CONSISTENCY = "consistency"
STAGES = (SETUP, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)
ACTIONS = {SETUP: "secagg_setup", SHARE_KEYS: "secagg_share_keys",
           MASKED_INPUT: "secagg_masked_input", CONSISTENCY: "secagg_consistency",
           UNMASK: "secagg_unmask"}

HEADER_KEY = "secagg"
PARAMS_KEY = "secagg-params"    # setup: clients (n sampled), sum-bits (b)
KEYS_KEY = "secagg-keys"        # setup reply: envelope-key, mask-key, institution, signature;
                                # share-keys: nodes, envelope-keys, mask-keys, threshold,
                                # institutions, signatures
SHARES_KEY = "secagg-shares"    # share-keys reply: recipients, envelopes, seed-commitment;
                                # masked-input: senders, envelopes
MASKED_KEY = "secagg-masked"    # masked-input reply (ArrayRecord): values, scalars
REPORT_KEY = "secagg-report"    # masked-input reply: bad-senders
CONSISTENCY_KEY = "secagg-consistency"  # consistency: survivors; reply: signature
UNMASK_KEY = "secagg-unmask"    # unmask: signers, signatures (or survivors, unauthenticated);
                                # reply: seed-owners, seed-shares, key-owners, key-shares

# Purposes of derived keys (HKDF info, with the round id as context).
SELF_MASK, PAIR_MASK, ENVELOPE_KEY = b"self-mask", b"pairwise-mask", b"share-envelope"


def message_type(stage: str) -> str:
    return f"train.{ACTIONS[stage]}"


@dataclasses.dataclass(frozen=True)
class RoundTag:
    """What binds every message and key to one run, round and secure-aggregation instance."""

    run_id: int
    server_round: int
    round_id: bytes

    @classmethod
    def new(cls, run_id: int, server_round: int) -> RoundTag:
        return cls(run_id, server_round, os.urandom(16))

    @classmethod
    def read(cls, content: RecordDict) -> tuple[RoundTag, str]:
        header = _record(content, HEADER_KEY)
        try:
            tag = cls(int(header["run-id"]), int(header["server-round"]), header["round-id"])
            stage = header["stage"]
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggError(f"'{HEADER_KEY}' header is incomplete: {err}") from None
        if not isinstance(tag.round_id, bytes) or stage not in STAGES:
            raise SecAggError(f"'{HEADER_KEY}' header is malformed")
        return tag, stage

    @property
    def context(self) -> bytes:
        return f"{self.run_id}/{self.server_round}/".encode() + self.round_id

    def header(self, stage: str) -> ConfigRecord:
        return ConfigRecord({"run-id": self.run_id, "server-round": self.server_round,
                             "round-id": self.round_id, "stage": stage})

    def check(self, content: RecordDict, stage: str) -> None:
        """Raise SecAggError unless ``content`` belongs to this round and ``stage``."""
        tag, got_stage = RoundTag.read(content)
        if tag != self:
            raise SecAggError(
                f"message belongs to run {tag.run_id} round {tag.server_round} (round id "
                f"{tag.round_id.hex()[:8]}), not to run {self.run_id} round "
                f"{self.server_round} ({self.round_id.hex()[:8]}): replayed or misrouted")
        if got_stage != stage:
            raise SecAggError(f"message is for stage '{got_stage}', expected '{stage}'")


def seed_commitment(tag: RoundTag, node: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed; checks the seed the server reconstructs."""
    return hashlib.sha256(b"sepal-secagg/v1/seed/" + tag.context + f"/{node}/".encode()
                          + seed).digest()


def pair_sign(me: int, other: int) -> int:
    """The lower node id adds the pairwise mask, the higher one subtracts it."""
    return 1 if me < other else -1


def _record(content: RecordDict, key: str):
    if key not in content:
        raise SecAggError(f"record '{key}' missing from the message")
    return content[key]


def config_field(content: RecordDict, record: str, key: str, kind: type, items: type | None = None):
    """A typed value of a ConfigRecord in ``content``, or SecAggError naming it."""
    value = _record(content, record).get(key)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and items is not None:
        ok = all(isinstance(item, items) and not isinstance(item, bool) for item in value)
    if not ok:
        expected = f"list of {items.__name__}" if items is not None else kind.__name__
        raise SecAggError(f"'{record}.{key}' must be {expected}, got {type(value).__name__}")
    return value
