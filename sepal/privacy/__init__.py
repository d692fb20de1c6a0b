"""Differential privacy: sample-level DP-SGD on clients (Opacus), site-enforced budgets,
and the client side of user-level DP. The server side lives in ``server/central_dp.py``
and ``server/privacy_monitor.py``."""

from sepal.privacy.config import (
    DPSGDSettings,
    EffectivePrivacy,
    SitePolicy,
    UserLevelDPSettings,
    site_policy,
)
from sepal.privacy.engine import ClientPrivacy, LocalPlan, calibrate_noise, check_run_settings
from sepal.privacy.ledger import PrivacyLedger
from sepal.privacy.refusal import PrivacyRefusal, Refusal
from sepal.privacy.user_level import clip_update

__all__ = [
    "ClientPrivacy",
    "DPSGDSettings",
    "EffectivePrivacy",
    "LocalPlan",
    "PrivacyLedger",
    "PrivacyRefusal",
    "Refusal",
    "SitePolicy",
    "UserLevelDPSettings",
    "calibrate_noise",
    "check_run_settings",
    "clip_update",
    "site_policy",
]
