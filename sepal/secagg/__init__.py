"""Secure aggregation (SecAgg+) primitives shared by the server workflow and the client.

``keys`` (X25519 + HKDF), ``masks`` (ChaCha20 mask expansion in Z_(2^b)), ``shamir``
(secret sharing over a prime field), ``envelope`` (AES-GCM share transport),
``fixedpoint`` (clipping, weighting, quantization), ``packing`` (b-bit packing),
``graph`` (neighbour graph and threshold), ``protocol`` (messages and bindings).
"""

from sepal.secagg.config import SecAggConfig
from sepal.secagg.errors import RoundAborted, SecAggError

__all__ = ["RoundAborted", "SecAggConfig", "SecAggError"]
