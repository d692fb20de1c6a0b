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

import itertools
import math
import secrets
from collections.abc import Callable, Mapping

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
    if len({x for x, _ in points}) != len(points):
        raise SecAggError("two shares have the same index")
    secret = _Polynomial(points)(0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("the shares are inconsistent: they do not interpolate to a "
                          f"{SECRET_BYTES}-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def robust_combine(shares: Mapping[int, bytes], threshold: int,
                   accept: Callable[[bytes], bool],
                   max_subsets: int = 4096) -> tuple[bytes, list[int]]:
    """The secret that ``accept`` confirms (a commitment or public key), rebuilt from some
    ``threshold`` of ``shares`` (holder -> share), and the holders whose share is not on
    the polynomial of that secret.

    Subsets are tried leaving out 0, 1, 2, ... holders, so e wrong shares cost about
    C(threshold + e, e) tries; SecAggError after ``max_subsets`` or when none is accepted.
    """
    points, unreadable = {}, []
    for holder in sorted(shares):
        try:
            points[holder] = _parse(shares[holder])
        except SecAggError:
            unreadable.append(holder)
    holders = sorted(points)
    if len({x for x, _ in points.values()}) != len(points):
        raise SecAggError("two shares have the same index")
    if len(holders) < threshold:
        raise SecAggError(f"only {len(holders)} of {len(shares)} share(s) are points of the "
                          f"field; the secret needs {threshold}")
    tried: set[tuple[int, ...]] = set()
    for left_out in range(len(holders) - threshold + 1):
        for excluded in itertools.combinations(holders, left_out):
            subset = tuple(h for h in holders if h not in excluded)[:threshold]
            if subset in tried:
                continue
            if len(tried) >= max_subsets:
                raise SecAggError(f"no {threshold} of the {len(holders)} shares checked out in "
                                  f"{max_subsets} tries")
            tried.add(subset)
            polynomial = _Polynomial([points[h] for h in subset])
            value = polynomial(0)
            if value >= 2 ** (8 * SECRET_BYTES):
                continue
            secret = value.to_bytes(SECRET_BYTES, "big")
            if accept(secret):
                bad = [h for h in holders if h not in subset
                       and polynomial(points[h][0]) != points[h][1]]
                return secret, sorted(bad + unreadable)
    raise SecAggError(f"no {threshold} of the {len(shares)} shares give the committed secret: "
                      f"more than {len(shares) - threshold} of them are wrong")


class _Polynomial:
    """The polynomial of degree len(points) - 1 through ``points``, in Lagrange form:
    f(x) = sum_i c_i prod_(j != i) (x - x_j) with c_i = y_i / prod_(j != i) (x_i - x_j).

    The share indices are small integers, so the products are exact integers and the
    c_i need one modular inversion for all of them; every evaluation is then O(t).
    """

    def __init__(self, points: list[tuple[int, int]]):
        self.xs = [x for x, _ in points]
        self.ys = [y for _, y in points]
        denominators = []
        for i, x_i in enumerate(self.xs):
            product = 1
            for j, x_j in enumerate(self.xs):
                if j != i:
                    product *= x_i - x_j
            denominators.append(product % PRIME)
        prefix = [1]
        for denominator in denominators:
            prefix.append(prefix[-1] * denominator % PRIME)
        inverse = pow(prefix[-1], -1, PRIME)  # of the product of all denominators
        self.coefficients = [0] * len(points)
        for i in reversed(range(len(points))):
            self.coefficients[i] = points[i][1] * inverse * prefix[i] % PRIME
            inverse = inverse * denominators[i] % PRIME

    def __call__(self, at: int) -> int:
        if at in self.xs:
            return self.ys[self.xs.index(at)]
        product = math.prod(at - x for x in self.xs)
        return sum(c * (product // (at - x)) for c, x in zip(self.coefficients, self.xs)) % PRIME


def _parse(share: bytes) -> tuple[int, int]:
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise SecAggError(f"a share must be {SHARE_BYTES} bytes")
    x = int.from_bytes(share[:X_BYTES], "big")
    y = int.from_bytes(share[X_BYTES:], "big")
    if x == 0 or y >= PRIME:
        raise SecAggError("a share is not a point of the field")
    return x, y
