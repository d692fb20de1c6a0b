"""The run's privacy statement: what each site's data is guaranteed, written at the end.

Like TF Privacy's ``compute_dp_sgd_privacy_statement``, each site's entry says ε at δ,
the accountant, the neighbour relation, the sampling rate, the steps, and what is and is
not covered. It is built from the last privacy report each site sent (its own accounting
of its data, never a number the server computes for it) and from the server's user-level
accountant. Written as ``privacy.json`` in the run's output folder and logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("sepal.server")

FILE_NAME = "privacy.json"
USER_LEVEL_NEIGHBOURS = ("one client's whole update replaced by zero (zero-out) in a round's "
                         "mean over the sampled clients")
NOT_COVERED = [
    "Federated evaluation metrics (loss, accuracy, macro-F1 and example count on a site's "
    "test split) are sent in the clear; the guarantee covers the training split only.",
    "The sampling rate 1/ceil(n/B) and the number of steps are public, as in Opacus and TF "
    "Privacy: they reveal a site's number of training examples n to within one batch.",
    "Trusted code: the guarantee holds only if a site runs ClientApp code it reviewed.",
    "A site that deletes its dp-state-dir, or runs without one, loses its lifetime count.",
    "Adaptive user-level clipping releases a noisy clipped-count each round, included in the "
    "user-level ε; sample-level ε does not cover what a site that does not run DP-SGD sends.",
]


def site_statement(node: int, report: Mapping[str, Any]) -> dict[str, Any]:
    """One site's guarantee, from its privacy report (untrusted: a missing or malformed
    field reads as unknown)."""
    entry = {
        "node": node,
        "epsilon": _number(report, "epsilon"),
        "delta": _number(report, "delta"),
        "accountant": str(report.get("accountant", "unknown")),
        "neighbours": str(report.get("neighbours", "unknown")),
        "sample_rate": _number(report, "sample-rate"),
        "dp_sgd_steps": _number(report, "steps"),
        "noise_multiplier": _number(report, "noise-multiplier"),
        "max_grad_norm": _number(report, "max-grad-norm"),
        "count_noise_multiplier": _number(report, "count-noise-multiplier"),
        "max_epsilon": _number(report, "max-epsilon") or None,
        "scope": ("every run charged to the site's lifetime ledger on this data"
                  if report.get("lifetime-ledger") is True else
                  "this Flower run only (the site keeps no dp-state-dir)"),
    }
    cap = f", within its cap ε = {entry['max_epsilon']:g}" if entry["max_epsilon"] else ""
    entry["statement"] = (
        f"Site {node}: DP-SGD is (ε = {_text(entry['epsilon'])}, δ = {_text(entry['delta'])})"
        f"-DP ({entry['accountant']} accountant, Opacus) for datasets that differ by "
        f"{entry['neighbours']}, over {_text(entry['dp_sgd_steps'])} steps of Poisson "
        f"sampling at rate {_text(entry['sample_rate'])} with noise multiplier "
        f"{_text(entry['noise_multiplier'])} and per-example clipping norm "
        f"{_text(entry['max_grad_norm'])}, the noisy example count (noise std "
        f"{_text(entry['count_noise_multiplier'])}) included; scope: {entry['scope']}{cap}.")
    return entry


def _number(report: Mapping[str, Any], key: str) -> float | None:
    value = report.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _text(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"


def privacy_statement(reports: Mapping[int, Mapping[str, Any]],
                      user_level: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole run's statement: every reporting site, user-level DP, what is not covered."""
    statement: dict[str, Any] = {
        "sites": {str(node): site_statement(node, report)
                  for node, report in sorted(reports.items())},
        "sites_without_sample_level_dp": "every site not listed under 'sites' trained "
                                         "without DP-SGD: its training data has no guarantee",
        "not_covered": NOT_COVERED,
    }
    if user_level:
        epsilon = user_level.get("epsilon")
        statement["user_level"] = {
            **user_level,
            "neighbours": USER_LEVEL_NEIGHBOURS,
            "statement": (
                f"The released aggregates are (ε = {epsilon:.4g}, δ = "
                f"{user_level['delta']:g})-DP for datasets of clients that differ by "
                f"{USER_LEVEL_NEIGHBOURS} (Flower's RdpAccountant, no amplification by client "
                "sampling)." if epsilon is not None else
                "User-level noise was added, but ε is not accounted around this strategy."),
        }
    return statement


def write_privacy_statement(folder: Path, statement: Mapping[str, Any]) -> Path:
    """``privacy.json`` in ``folder`` (atomically); logs each site's statement."""
    path = folder / FILE_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(statement, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    for site in statement["sites"].values():
        log.info("privacy: %s", site["statement"])
    if "user_level" in statement:
        log.info("privacy: %s", statement["user_level"]["statement"])
    return path
