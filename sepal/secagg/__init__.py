"""Secure aggregation (SecAgg+) primitives shared by the server workflow and the client.

Written here: Flower's ``SecAggPlusWorkflow`` needs its legacy ``LegacyContext`` workflow (not
Message API strategies) and has no authenticated keys or survivor-set check, and no
maintained Python SecAgg+ library exists; the cryptography itself is ``cryptography``'s.

``keys`` (X25519 + HKDF), ``masks`` (ChaCha20 mask expansion in Z_(2^b)), ``shamir``
(secret sharing over a prime field), ``envelope`` (AES-GCM share transport),
``fixedpoint`` (clipping, weighting, quantization), ``packing`` (b-bit packing),
``graph`` (neighbour graph and threshold), ``protocol`` (messages and bindings).
"""

from sepal.secagg.config import SecAggConfig
from sepal.secagg.errors import RoundAborted, SecAggError

__all__ = ["RoundAborted", "SecAggConfig", "SecAggError"]
