"""What a run prints: a header, one aligned line per round, a closing summary."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sepal.settings import Settings


def run_header(run_name: str, settings: Settings, model, connected: int,
               folder: Path, streaming: bool = False) -> list[str]:
    """The run's settings in a few lines, before round 1; ``streaming``: the server sums
    uploads as they arrive (``server/streaming.py``)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg, strategy, compression = settings.run, settings.strategy, settings.compression
    dp, user_dp, secagg = settings.dp, settings.user_dp, settings.secagg
    privacy = []
    if dp.dp_sgd:
        privacy.append(f"DP-SGD on every site, target eps {dp.dp_target_epsilon:g} at "
                       f"delta {dp.dp_delta:g}, clipping norm {dp.dp_max_grad_norm:g}")
    if user_dp.enabled:
        privacy.append(f"user-level {user_dp.user_dp}, noise multiplier "
                       f"{user_dp.user_dp_noise_multiplier:g}")
    params = f" ({strategy.strategy_params})" if strategy.strategy_params else ""
    rows = [
        ("model", f"{cfg.model} ({cfg.pooling} pooling), {total:,} parameters, "
                  f"{trainable:,} trainable"),
        ("data", f"{cfg.dataset} (train '{cfg.train_split}', test '{cfg.test_split}')"),
        ("sites", f"{connected} connected; a round needs {cfg.min_train_nodes}"),
        ("rounds", f"{cfg.num_server_rounds} x {cfg.local_epochs} local epoch(s), "
                   f"lr {cfg.learning_rate:g}, batch {cfg.batch_size}"),
        ("strategy", f"{strategy.strategy}{params}, " + _aggregation(secagg.enabled, streaming)),
        ("codec", f"upload {compression.upload_codec}, download {compression.download_codec}"),
        ("privacy", "; ".join(privacy) or "off (no differential privacy)"),
        ("secure aggregation", f"on, {secagg.secagg_value_bits}-bit values clipped to "
                               f"+-{secagg.secagg_clip:g}" if secagg.enabled else "off"),
        ("output folder", str(folder)),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"Sepal run {run_name}"] + [f"  {name:<{width}}  {value}" for name, value in rows]


def _aggregation(secure: bool, streaming: bool) -> str:
    if secure:
        return "on the secure sum of the uploads"
    return "uploads summed as they arrive" if streaming else "every upload held for the strategy"


def round_line(record: dict[str, Any], num_rounds: int) -> str:
    """``record`` is the round's entry in metrics.jsonl (see server/federation.py).

    answered: valid updates aggregated; failed: clients that reported an error or did
    not reply in time; refused: uploads the server rejected plus clients that declined
    to train (``refused``, e.g. a spent privacy budget). Epsilons as the privacy
    monitor records them: ``epsilon_per_client`` (cumulative, each site's DP-SGD) and
    ``user_level_epsilon`` (central DP on the aggregate). Columns keep their width
    from round to round; optional notes go at the end.
    """
    width = len(str(num_rounds))
    timed_out = int(record.get("timed_out", 0))
    failed = int(record.get("failed", 0)) + timed_out
    refused = int(record.get("rejected", 0)) + int(record.get("refused", 0))
    up = sum(record.get("bytes_up_per_client", {}).values())
    down = sum(record.get("bytes_down_per_client", {}).values())
    parts = [
        f"round {record['round']:>{width}}/{num_rounds}",
        f"{record['clients']:>2}/{record['sampled']:<2} answered",
        f"{failed:>2} failed ({timed_out} timed out)",
        f"{refused:>2} refused",
        f"accuracy {record['accuracy']:.4f}",
        f"macro-F1 {record.get('macro_f1', float('nan')):.4f}",
    ]
    per_client = record.get("epsilon_per_client") or {}
    if per_client:
        parts.append(f"eps max {max(per_client.values()):6.3g} (sample-level)")
    if "user_level_epsilon" in record:
        parts.append(f"user-level eps {record['user_level_epsilon']:6.3g}")
    parts += [f"up {up / 1e6:8.2f} MB", f"down {down / 1e6:8.2f} MB",
              f"{record['wall_time_s']:6.1f}s"]
    if record.get("skipped"):
        parts.append("skipped: too few updates, model kept")
    if record.get("late_discarded"):
        parts.append(f"{record['late_discarded']} late repl(ies) discarded")
    return " | ".join(parts)


def run_summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The closing lines, from ``summary.json``'s content (server/run_output.py)."""
    final = summary["final"]
    best = summary["best_accuracy"]
    lines = [
        f"Run finished: {summary['rounds_completed']} round(s) in "
        f"{summary['wall_time_s']:.1f}s",
        f"  final   accuracy {final.get('accuracy', float('nan')):.4f}, macro-F1 "
        f"{final.get('macro_f1', float('nan')):.4f} (round {final.get('round')})",
        f"  best    accuracy {best['value']:.4f} (round {best['round']})",
        f"  traffic up {summary['bytes_up_total'] / 1e6:.2f} MB, down "
        f"{summary['bytes_down_total'] / 1e6:.2f} MB",
    ]
    if "worst_class_recall" in summary:
        lines.append(f"  worst class recall {summary['worst_class_recall']:.4f}")
    privacy = summary.get("privacy", {})
    if "per_site" in privacy:
        spent = ", ".join(f"{site} eps {values.get('epsilon', float('nan')):.3g}"
                          for site, values in privacy["per_site"].items())
        lines.append(f"  privacy {spent}")
    if "user_level" in privacy:
        lines.append(f"  privacy user-level eps {privacy['user_level']['epsilon']:.3g} at "
                     f"delta {privacy['user_level']['delta']:g}")
    paths = summary["paths"]
    if "checkpoints" in paths:
        lines.append(f"  checkpoints {summary['checkpoint_bytes'] / 1e6:.1f} MB on disk in "
                     f"{paths['checkpoints']}")
    lines.append(f"  outputs {paths['folder']} (summary.json, metrics.jsonl, plot.png, model/)")
    return lines
