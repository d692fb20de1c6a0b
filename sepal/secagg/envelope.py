"""AES-256-GCM envelopes for the shares one client sends another through the server.

The server routes the envelopes but holds no key for them. The associated data
names the round, the stage, the sender and the recipient, so an envelope that is
altered, replayed from another round or delivered to the wrong client fails
authentication instead of yielding a wrong share.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sepal.secagg.errors import SecAggError

NONCE_BYTES = 12


def associated_data(round_id: bytes, stage: str, sender: int, recipient: int) -> bytes:
    return b"|".join([round_id, stage.encode(), str(sender).encode(), str(recipient).encode()])


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_envelope(key: bytes, envelope: bytes, associated: bytes) -> bytes:
    if not isinstance(envelope, bytes) or len(envelope) <= NONCE_BYTES:
        raise SecAggError("share envelope is truncated")
    try:
        return AESGCM(key).decrypt(envelope[:NONCE_BYTES], envelope[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError("share envelope failed authentication (tampered, replayed or "
                          "misrouted)") from None
