"""What the server learns about privacy each round, and whether the run can go on.

Clients under DP-SGD report their cumulative ε (sample-level, at their δ) in every reply,
refusals included; a site whose next round would pass its budget refuses with a code and a
reason and takes no further part (ε only grows). So does a site that cannot know what it
spent before a resume (``ledger-unavailable``, no ε report): it keeps the last ε it
reported before the interruption. The run stops cleanly, outputs and model written, once
fewer sites than ``min-train-nodes`` can still train. With user-level DP the server's own
accountant adds the user-level ε of the released aggregates.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp.strategy import Strategy

from sepal.privacy.refusal import Refusal
from server.central_dp import UserLevelDP
from server.privacy_statement import privacy_statement
from server.uploads import DecodedRound

log = logging.getLogger("sepal.server")


class PrivacyMonitor:
    """Per-client ε, refusals and stopped sites, user-level ε; decides when to stop."""

    def __init__(self, min_train_nodes: int, strategy: Strategy | None = None):
        self.min_train_nodes = min_train_nodes
        self.user_level = strategy if isinstance(strategy, UserLevelDP) else None
        self.epsilon: dict[int, float] = {}
        self.reports: dict[int, dict[str, Any]] = {}  # each site's last privacy report
        self.stopped_sites: dict[int, Refusal] = {}
        self.stop_reason: str | None = None

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Resume: each site's last reported ε, from the checkpoint's round records."""
        for record in rounds:
            for node, epsilon in record.get("epsilon_per_client", {}).items():
                self.epsilon[int(node)] = float(epsilon)
            for node, report in record.get("privacy_reports", {}).items():
                self.reports[int(node)] = dict(report)

    def round_record(self, decoded: DecodedRound, connected_nodes: int) -> dict[str, Any]:
        """The round's privacy fields for metrics.jsonl; decides whether the run stops."""
        record: dict[str, Any] = {}
        for node, report in decoded.privacy.items():
            self.epsilon[node] = float(report["epsilon"])
            self.reports[node] = dict(report)
        for node, refusal in decoded.refused.items():
            if node not in self.stopped_sites:
                log.warning("site %d stopped taking part (%s): %s", node, refusal.code,
                            refusal.reason)
            self.stopped_sites[node] = refusal
        if decoded.privacy:
            record["epsilon_per_client"] = {str(k): v for k, v in sorted(self.epsilon.items())}
            record["delta_per_client"] = {str(k): float(v["delta"])
                                          for k, v in sorted(decoded.privacy.items())}
            record["privacy_reports"] = {str(k): dict(v)
                                         for k, v in sorted(decoded.privacy.items())}
        if decoded.refused:
            record["refusals"] = {str(k): {"code": r.code, "reason": r.reason}
                                  for k, r in decoded.refused.items()}
        if self.stopped_sites:
            record["sites_stopped"] = sorted(str(k) for k in self.stopped_sites)
        spent = self.user_level.privacy_spent() if self.user_level is not None else None
        if spent is not None:
            record["user_level_epsilon"] = spent.epsilon
            record["user_level_delta"] = spent.delta
        if self.user_level is not None:
            record["user_level_clipping_norm"] = self.user_level.clipping_norm()
        able = connected_nodes - len(self.stopped_sites)
        if self.stopped_sites and able < self.min_train_nodes:
            self.stop_reason = (
                f"only {able} site(s) can still train, fewer than min-train-nodes "
                f"{self.min_train_nodes}; stopped: " + ", ".join(
                    f"{node} ({refusal.code})" for node, refusal in self.stopped_sites.items()))
            record["run_stopped"] = self.stop_reason
        return record

    def statement(self) -> dict[str, Any]:
        """The run's privacy statement (``server/privacy_statement.py``) so far."""
        user_level = None
        if self.user_level is not None:
            spent = self.user_level.privacy_spent()
            settings = self.user_level.settings
            user_level = {
                "mode": settings.user_dp,
                "epsilon": spent.epsilon if spent is not None else None,
                "delta": spent.delta if spent is not None else settings.user_dp_delta,
                "noise_multiplier": settings.user_dp_noise_multiplier,
                "clipping_norm": self.user_level.clipping_norm(),
            }
        return privacy_statement(self.reports, user_level)
