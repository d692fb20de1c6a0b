"""Client side of user-level DP with client-side clipping (``user-dp = client-*``).

Flower's ``fixedclipping_mod``/``adaptiveclipping_mod`` clip a reply that holds full model
weights (``reply - sent``). A Sepal reply holds the codec's payload of the update instead,
so the same clipping (Flower's own functions) runs here, on ``local - global``, before the
update is encoded. The server's ``DifferentialPrivacyClientSide*`` wrapper sends the norm.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    adaptive_clip_inputs_inplace,
    clip_inputs_inplace,
)

from sepal.privacy.config import UserLevelDPSettings


def clip_update(update: OrderedDict[str, np.ndarray], config: ConfigRecord,
                settings: UserLevelDPSettings) -> dict[str, int]:
    """Clip ``update`` in place to the server's clipping norm; returns metrics to add
    (the norm bit, 1 when clipped, for adaptive clipping)."""
    if not (settings.enabled and settings.client_side):
        return {}
    if KEY_CLIPPING_NORM not in config:
        raise ValueError(f"run config 'user-dp' is {settings.user_dp!r} but the server sent no "
                         f"'{KEY_CLIPPING_NORM}' (is the server's strategy wrapped?)")
    norm = float(config[KEY_CLIPPING_NORM])
    arrays = list(update.values())
    if settings.adaptive:
        return {KEY_NORM_BIT: int(adaptive_clip_inputs_inplace(arrays, norm))}
    clip_inputs_inplace(arrays, norm)
    return {}
