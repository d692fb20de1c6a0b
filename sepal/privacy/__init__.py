"""Differential privacy: sample-level DP-SGD on clients (Opacus), site-enforced budgets,
and the client side of user-level DP. The server side lives in ``server/central_dp.py``
and ``server/privacy_monitor.py``.

The package itself is torch-free (settings, refusals, ledger, user-level clipping), so that
the ClientApp's secure-aggregation stages can import it cheaply; the DP-SGD engine, which
needs torch and Opacus, is imported from ``sepal.privacy.engine``.
"""

from sepal.privacy.config import (
    DPSGDConfig,
    EffectivePrivacy,
    SitePolicy,
    UserLevelDPConfig,
    site_policy,
)
from sepal.privacy.ledger import PrivacyLedger
from sepal.privacy.refusal import PrivacyRefusal, Refusal
from sepal.privacy.user_level import clip_update

__all__ = [
    "DPSGDConfig",
    "EffectivePrivacy",
    "PrivacyLedger",
    "PrivacyRefusal",
    "Refusal",
    "SitePolicy",
    "UserLevelDPConfig",
    "clip_update",
    "site_policy",
]
