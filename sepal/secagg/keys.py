"""Ephemeral X25519 key pairs and the symmetric keys two parties derive from them.

Each client makes two key pairs per round: one whose agreements seed the pairwise
masks (its private half is secret-shared, so that the others can cancel the masks
of a client that drops) and one whose agreements key the encryption of the shares
(never shared). :func:`agree` turns an X25519 agreement into a 32-byte key with
HKDF-SHA256, bound to a purpose and to the round so that no key serves twice.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from sepal.secagg.errors import SecAggError

KEY_BYTES = 32
KDF_LABEL = b"sepal-secagg/v1/"


@dataclasses.dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        private = X25519PrivateKey.generate()
        return cls(
            private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )


def public_key_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key (checks a reconstructed secret)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(public: bytes, owner: str) -> None:
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise SecAggError(f"public key of {owner} must be {KEY_BYTES} bytes")


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, purpose: bytes,
          context: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public)) for ``purpose`` within ``context``.

    Symmetric: both ends of a pair derive the same key. A peer key that yields the
    all-zero agreement (a small-order point) is refused by ``cryptography``. Loading
    the private key costs as much as the agreement: a caller agreeing with many peers
    passes it loaded (``X25519PrivateKey.from_private_bytes``).
    """
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise SecAggError(f"X25519 agreement failed: {err}") from err
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None,
                info=KDF_LABEL + purpose + b"/" + context).derive(shared)


def derive(seed: bytes, purpose: bytes, context: bytes) -> bytes:
    """A 32-byte key for ``purpose`` expanded from a secret ``seed`` (HKDF-SHA256)."""
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None,
                info=KDF_LABEL + purpose + b"/" + context).derive(seed)
