"""The one log line per round that lets an operator follow a run while it runs."""

from __future__ import annotations

from typing import Any


def round_line(record: dict[str, Any], num_rounds: int) -> str:
    """``record`` is the round's entry in metrics.jsonl (see server/federation.py).

    answered: valid updates aggregated; failed: clients that reported an error or did
    not reply in time; refused: uploads the server rejected plus clients that declined
    to train (``refused``, e.g. a spent privacy budget). Epsilons as the privacy
    monitor records them: ``epsilon_per_client`` (cumulative, each site's DP-SGD) and
    ``user_level_epsilon`` (central DP on the aggregate).
    """
    timed_out = int(record.get("timed_out", 0))
    failed = int(record.get("failed", 0)) + timed_out
    refused = int(record.get("rejected", 0)) + int(record.get("refused", 0))
    parts = [
        f"round {record['round']}/{num_rounds}",
        f"{record['clients']}/{record['sampled']} answered",
        f"{failed} failed ({timed_out} timed out)",
        f"{refused} refused",
    ]
    if record.get("skipped"):
        parts.append("skipped: too few updates, model kept")
    parts.append(f"accuracy {record['accuracy']:.4f}")
    per_client = record.get("epsilon_per_client") or {}
    if per_client:
        parts.append(f"eps max {max(per_client.values()):.3g} (sample-level, over clients)")
    if "user_level_epsilon" in record:
        parts.append(f"user-level eps {record['user_level_epsilon']:.3g}")
    up = sum(record.get("bytes_up_per_client", {}).values())
    down = sum(record.get("bytes_down_per_client", {}).values())
    parts.append(f"up {up / 1e6:.2f} MB, down {down / 1e6:.2f} MB")
    if record.get("late_discarded"):
        parts.append(f"{record['late_discarded']} late repl(ies) discarded")
    parts.append(f"{record['wall_time_s']:.1f}s")
    return ", ".join(parts)

