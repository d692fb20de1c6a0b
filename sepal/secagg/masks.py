"""Mask vectors in Z_(2^b) expanded from 32-byte seeds with ChaCha20.

A mask is the ChaCha20 keystream (``cryptography``/OpenSSL) under a key derived
from the seed, read as little-endian words and reduced mod 2^b. Words of 32 bits
serve any b <= 32 and words of 64 bits any b <= 64: 2^b divides the word size, so
the low b bits of a uniform word are uniform in Z_(2^b) and all arithmetic can run
in native wrapping unsigned integers, reduced once at the end.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# ChaCha20 nonce = 4-byte block counter + 12-byte nonce; one stream per vector segment.
VALUES_NONCE = bytes(16)
SCALARS_NONCE = bytes(4) + (1).to_bytes(12, "little")


def word_dtype(bits: int) -> np.dtype:
    if not 1 <= bits <= 64:
        raise ValueError(f"mask width must be 1..64 bits, got {bits}")
    return np.dtype(np.uint32 if bits <= 32 else np.uint64)


class MaskExpander:
    """Adds or subtracts seed-expanded masks to vectors of one length and word type.

    The keystream is produced block by block into one small reused buffer and added
    at once, so it never exists in full (no memory the size of the model, and the
    block is still in cache when it is added). Producing it into fresh memory with
    ``update`` costs an order of magnitude more than the cipher itself.
    """

    BLOCK_BYTES = 1 << 20

    def __init__(self, length: int, dtype: np.dtype, nonce: bytes = VALUES_NONCE):
        self.length = length
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.nonce = nonce
        self.block = max(1, self.BLOCK_BYTES // self.dtype.itemsize)
        size = min(self.block, length) * self.dtype.itemsize
        self._zeros = memoryview(bytes(size))
        self._stream = np.empty(size + 64, dtype=np.uint8)

    def add(self, target: np.ndarray, key: bytes, sign: int = 1) -> None:
        """``target += sign * mask(key)`` in wrapping unsigned arithmetic."""
        encryptor = Cipher(algorithms.ChaCha20(key, self.nonce), mode=None).encryptor()
        operation = np.add if sign > 0 else np.subtract
        for start in range(0, self.length, self.block):
            stop = min(start + self.block, self.length)
            size = (stop - start) * self.dtype.itemsize
            encryptor.update_into(self._zeros[:size], self._stream)
            words = self._stream[:size].view(self.dtype)
            operation(target[start:stop], words, out=target[start:stop])

    def mask(self, key: bytes) -> np.ndarray:
        """The whole mask for ``key`` (tests and inspection)."""
        mask = np.zeros(self.length, dtype=self.dtype)
        self.add(mask, key)
        return mask


class VectorMasks:
    """Masks for a masked input: the values in Z_(2^b) and the scalars in Z_(2^64).

    The two segments draw from separate ChaCha20 streams (different nonces) of the
    same key.
    """

    def __init__(self, length: int, bits: int, scalars: int):
        self.values = MaskExpander(length, word_dtype(bits), VALUES_NONCE)
        self.scalars = MaskExpander(scalars, np.dtype(np.uint64), SCALARS_NONCE)

    def add(self, values: np.ndarray, scalars: np.ndarray, key: bytes, sign: int = 1) -> None:
        self.values.add(values, key, sign)
        self.scalars.add(scalars, key, sign)
