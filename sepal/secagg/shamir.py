"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Written here rather than taken from a library: ``cryptography`` has none, and
pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` (what Flower uses) shares
exactly 16-byte secrets over GF(2^128), so a 32-byte seed or X25519 key has to be
cut into independently shared halves with padding, and its share indices are
limited to one byte. Over a prime field above 2^256 a whole secret is one field
element and a share is one point: ``x`` (2 bytes) then ``f(x)`` (66 bytes).

``split(secret, t, n)`` draws a random polynomial f of degree t - 1 with
f(0) = secret and returns the points x = 1..n; any t of them give back f(0) by
Lagrange interpolation, fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets

from sepal.secagg.errors import SecAggError

PRIME = 2**521 - 1  # a Mersenne prime
SECRET_BYTES = 32
X_BYTES = 2
Y_BYTES = (PRIME.bit_length() + 7) // 8
SHARE_BYTES = X_BYTES + Y_BYTES
MAX_SHARES = 2 ** (8 * X_BYTES) - 1


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` shares of ``secret``; any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise SecAggError(f"need 1 <= threshold ({threshold}) <= shares ({count}) <= {MAX_SHARES}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares.append(x.to_bytes(X_BYTES, "big") + y.to_bytes(Y_BYTES, "big"))
    return shares


def combine(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (uses the first ``threshold``)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s) cannot reconstruct a secret that needs "
                          f"{threshold}")
    points = [_parse(share) for share in shares[:threshold]]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise SecAggError("two shares have the same index")
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("the shares are inconsistent: they do not interpolate to a "
                          f"{SECRET_BYTES}-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _parse(share: bytes) -> tuple[int, int]:
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise SecAggError(f"a share must be {SHARE_BYTES} bytes")
    x = int.from_bytes(share[:X_BYTES], "big")
    y = int.from_bytes(share[X_BYTES:], "big")
    if x == 0 or y >= PRIME:
        raise SecAggError("a share is not a point of the field")
    return x, y
