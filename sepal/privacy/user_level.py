"""Client side of user-level DP with client-side clipping (``user-dp = client-*``).

Flower's ``fixedclipping_mod``/``adaptiveclipping_mod`` clip a reply that holds full model
weights (``reply - sent``). A Sepal reply holds the codec's payload of the update instead,
so the same clipping (Flower's own functions) runs here, on ``local - global``, before the
update is encoded. The server's ``DifferentialPrivacyClientSide*`` wrapper sends the norm.

What leaves the client is the clipped update after rounding: the upload codec's
quantization and secure aggregation's fixed point. Stochastic rounding moves each value by
less than one grid step, so it can lengthen the update; :class:`Rounding` bounds by how
much, and the client clips to a smaller norm so that the rounded update stays within the
norm the server's noise is calibrated to.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    adaptive_clip_inputs_inplace,
    clip_inputs_inplace,
)

from sepal.codecs.chain import parse_chain
from sepal.config import require
from sepal.privacy.config import UserLevelDPConfig
from sepal.secagg.config import SecAggConfig


@dataclasses.dataclass(frozen=True)
class Rounding:
    """Worst-case lengthening of a clipped update x by the rounding after clipping.

    Quantizing codec at b bits, blocks of at most m values with scale s_j (the block's
    largest magnitude, at most ||x_j||) and grid step 2 s_j / (2^b - 1):

        ||Q(x) - x||^2 < sum_j m (2 s_j / (2^b - 1))^2 <= (2 sqrt(m) / (2^b - 1))^2 ||x||^2

    so ||Q(x)|| <= ||x|| (1 + r) with r = ``relative``. Secure aggregation then rounds
    each of the d values to a multiple of c / (2^(q-1) - 1) (clipping to [-c, c] only
    shortens): + a = ``absolute`` = sqrt(d) c / (2^(q-1) - 1). The sensitivity of the
    sum to one client is C when every client clips to (C - a) / (1 + r).
    """

    relative: float = 0.0
    absolute: float = 0.0

    @classmethod
    def of_upload(cls, dim: int, upload_codec: str, secagg: SecAggConfig) -> Rounding:
        spec = parse_chain(upload_codec)
        require(not spec.error_feedback, "upload-codec",
                f"{upload_codec!r}: error feedback adds earlier rounds' residuals to the update "
                "after clipping, so user-level DP with client-side clipping cannot bound one "
                "client's contribution; drop 'ef'")
        relative = 0.0
        if spec.bits:
            block = spec.block if spec.block else dim
            relative = 2 * math.sqrt(min(block, dim)) / ((1 << spec.bits) - 1)
        absolute = 0.0
        if secagg.enabled:
            absolute = math.sqrt(dim) * secagg.secagg_clip / (2 ** (secagg.secagg_value_bits - 1) - 1)
        return cls(relative, absolute)

    def clipping_norm(self, norm: float) -> float:
        """The norm to clip to so that the rounded update stays within ``norm``.

        Raises ConfigError naming the setting when rounding would take more than half of
        it: the update would be mostly rounding noise."""
        inner = (norm - self.absolute) / (1 + self.relative)
        require(self.absolute <= norm / 4, "secagg-value-bits",
                f"too few for user-level DP: secure aggregation's rounding can lengthen an "
                f"update by {self.absolute:.4g}, more than a quarter of the clipping norm "
                f"{norm:g}; raise secagg-value-bits or lower secagg-clip")
        require(inner >= norm / 2, "upload-codec",
                f"quantizes too coarsely for user-level DP: its rounding can lengthen a "
                f"clipped update by a factor {1 + self.relative:.4g}; use more bits, smaller "
                "blocks, or a dense codec")
        return inner


def clip_update(update: OrderedDict[str, np.ndarray], config: ConfigRecord,
                settings: UserLevelDPConfig, rounding: Rounding = Rounding()) -> dict[str, int]:
    """Clip ``update`` in place to the server's clipping norm, less what ``rounding`` can
    add; returns metrics to add (the norm bit, 1 when clipped, for adaptive clipping)."""
    if not (settings.enabled and settings.client_side):
        return {}
    if KEY_CLIPPING_NORM not in config:
        raise ValueError(f"run config 'user-dp' is {settings.user_dp!r} but the server sent no "
                         f"'{KEY_CLIPPING_NORM}' (is the server's strategy wrapped?)")
    norm = rounding.clipping_norm(float(config[KEY_CLIPPING_NORM]))
    arrays = list(update.values())
    if settings.adaptive:
        return {KEY_NORM_BIT: int(adaptive_clip_inputs_inplace(arrays, norm))}
    clip_inputs_inplace(arrays, norm)
    return {}
