"""Everything a run leaves on disk, in its own folder.

``config.json``      every setting of the run (all run-config sections), by field name
``metrics.jsonl``    one JSON object per round (round 0 = the initial model)
``summary.json``     final and best scores, traffic, privacy spent, wall time, paths
``tensorboard/``     the same scalars for TensorBoard, sites named ``site-N``
``plot.png``         accuracy and loss over rounds, redrawn after every round
``model/``           the final global model, ``save_pretrained`` (model + tokenizer)
``privacy.json``     what each site's data is guaranteed (``server/privacy_statement.py``)

Node ids are drawn anew by Flower for every run; TensorBoard tags and the summary name
the sites ``site-1``, ``site-2``, ... in the order their node ids first took part
(ascending within a round), and ``summary.json`` maps each name to its node id.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class RunFolderError(RuntimeError):
    """The run folder belongs to another run, or another run of this name is running."""


class RunLock:
    """An exclusive lock on a run name (``<output-dir>/.<run-name>.lock``), held while the
    run lives, so two runs of one name never write the same folder.

    ``fcntl.flock``: the kernel drops the lock when the process ends, however it ends.
    """

    def __init__(self, folder: Path):
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.path = folder.parent / f".{folder.name}.lock"
        self._handle = self.path.open("a")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise RunFolderError(f"run-name '{folder.name}' is in use by another running run "
                                 f"(lock {self.path}); wait for it or choose another "
                                 "run-name") from None

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_folder(folder: Path, resume: bool) -> RunLock:
    """Lock the run name; a fresh run refuses a folder that already holds files (a past
    run's metrics and model), a resumed one continues it."""
    lock = RunLock(folder)
    if not resume and folder.is_dir() and any(folder.iterdir()):
        lock.release()
        raise RunFolderError(f"run folder {folder} already holds a run: choose another "
                             "run-name, or set resume = true to continue it")
    return lock


class RunOutput:
    def __init__(self, folder: Path, config: dict[str, Any]):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = folder / "metrics.jsonl"
        self.plot_path = folder / "plot.png"
        self.model_path = folder / "model"
        self.config_path = folder / "config.json"
        self.summary_path = folder / "summary.json"
        _write_atomic(self.config_path, json.dumps(config, indent=2, sort_keys=True))
        self._rounds: list[dict[str, Any]] = []
        self._sites: dict[str, str] = {}  # node id -> site-N
        self._writer = None

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self._rounds)

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Start from metrics recorded before (resume); rewrites the file to match."""
        self._rounds = list(rounds)
        for record in self._rounds:
            self._name_sites(record)
        _write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rounds))

    def record_round(self, record: dict[str, Any]) -> None:
        self._rounds.append(record)
        self._name_sites(record)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._tensorboard(record)
        self.plot()

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder / "tensorboard"))
        step = int(record["round"])
        for key, value in _flat_scalars(record, self._sites).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def plot(self) -> None:
        evaluated = [r for r in self._rounds if "accuracy" in r]
        if not evaluated:
            return
        rounds = [r["round"] for r in evaluated]
        private = [r for r in self._rounds if "epsilon_per_client" in r or "user_level_epsilon" in r]
        figure, (acc_axis, loss_axis, *privacy_axis) = plt.subplots(
            1, 3 if private else 2, figsize=(15 if private else 10, 4))
        acc_axis.plot(rounds, [r["accuracy"] for r in evaluated], marker="o", label="accuracy")
        acc_axis.plot(rounds, [r["macro_f1"] for r in evaluated], marker="s", label="macro-F1")
        acc_axis.set_xlabel("round")
        acc_axis.set_title("global model on the test split")
        acc_axis.legend()
        loss_axis.plot(rounds, [r["loss"] for r in evaluated], marker="o", label="test loss")
        trained = [r for r in self._rounds if "train_loss" in r]
        if trained:
            loss_axis.plot([r["round"] for r in trained], [r["train_loss"] for r in trained],
                           marker="^", label="train loss (clients)")
        loss_axis.set_xlabel("round")
        loss_axis.set_title("loss")
        loss_axis.legend()
        if private:
            _plot_privacy(privacy_axis[0], private, self._sites)
        figure.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        figure.savefig(tmp, dpi=100)
        plt.close(figure)
        os.replace(tmp, self.plot_path)

    def _name_sites(self, record: Mapping[str, Any]) -> None:
        nodes = list(record.get("bytes_down_per_client", {}))
        for key in PER_NODE_KEYS:
            nodes += [node for node in record.get(key, {}) if node not in nodes]
        for node in sorted(nodes, key=_node_order):
            self._sites.setdefault(str(node), f"site-{len(self._sites) + 1}")

    @property
    def sites(self) -> dict[str, str]:
        """Node id -> the site name TensorBoard and the summary use."""
        return dict(self._sites)

    def write_summary(self, wall_time_s: float,
                      checkpoint_folder: Path | None = None) -> dict[str, Any]:
        """Write and return ``summary.json`` (see :func:`run_summary`)."""
        summary = run_summary(self._rounds, self._sites, wall_time_s, {
            "folder": self.folder, "config": self.config_path, "metrics": self.metrics_path,
            "summary": self.summary_path, "plot": self.plot_path, "model": self.model_path,
            "tensorboard": self.folder / "tensorboard", "checkpoints": checkpoint_folder,
        })
        _write_atomic(self.summary_path, json.dumps(summary, indent=2))
        return summary

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plot_privacy(axis, rounds: list[dict[str, Any]], sites: Mapping[str, str]) -> None:
    """Cumulative ε per client (sample-level DP-SGD) and user-level ε, by round."""
    clients = sorted({node for r in rounds for node in r.get("epsilon_per_client", {})})
    for node in clients:
        points = [(r["round"], r["epsilon_per_client"][node]) for r in rounds
                  if node in r.get("epsilon_per_client", {})]
        axis.plot(*zip(*points), marker="o", label=sites.get(str(node), str(node)))
    user_level = [(r["round"], r["user_level_epsilon"]) for r in rounds if "user_level_epsilon" in r]
    if user_level:
        axis.plot(*zip(*user_level), marker="s", linestyle="--", color="black",
                  label="user-level")
    axis.set_xlabel("round")
    axis.set_title("privacy spent (cumulative ε)")
    axis.legend(fontsize="small")


PER_NODE_KEYS = ("bytes_up_per_client", "epsilon_per_client", "delta_per_client",
                 "offenders", "rejected_reasons", "refusals")


def run_summary(rounds: list[dict[str, Any]], sites: Mapping[str, str], wall_time_s: float,
                paths: Mapping[str, Path | None]) -> dict[str, Any]:
    """A run in one JSON object: final and best scores, traffic, privacy, time, paths.

    ``final`` and ``best_accuracy`` / ``best_macro_f1`` are scores of the global model on
    the test split (``round`` 0 is the initial model); ``per_class`` and
    ``worst_class_recall`` come from the last round when its record has them; ``privacy``
    holds each site's last reported ε and δ (sample-level DP-SGD) and the user-level ε
    and δ, where the run reported them.
    """
    evaluated = [r for r in rounds if "accuracy" in r]
    last = evaluated[-1] if evaluated else {}
    best_accuracy = max(evaluated, key=lambda r: r["accuracy"], default={})
    best_f1 = max(evaluated, key=lambda r: r.get("macro_f1", float("-inf")), default={})
    summary: dict[str, Any] = {
        "rounds_completed": max((int(r["round"]) for r in rounds), default=0),
        "final": {key: last[key] for key in ("round", "accuracy", "macro_f1", "loss")
                  if key in last},
        "best_accuracy": {"round": best_accuracy.get("round"),
                          "value": best_accuracy.get("accuracy")},
        "best_macro_f1": {"round": best_f1.get("round"), "value": best_f1.get("macro_f1")},
    }
    for key in ("per_class", "worst_class_recall"):
        if key in last:
            summary[key] = last[key]
    summary["bytes_up_total"] = sum(sum(r.get("bytes_up_per_client", {}).values())
                                    for r in rounds)
    summary["bytes_down_total"] = sum(sum(r.get("bytes_down_per_client", {}).values())
                                      for r in rounds)
    summary["sites"] = {name: int(node) if node.isdigit() else node
                        for node, name in sites.items()}
    privacy = _privacy_spent(rounds, sites)
    if privacy:
        summary["privacy"] = privacy
    summary["wall_time_s"] = round(wall_time_s, 3)
    summary["elapsed_s"] = float(rounds[-1].get("elapsed_s", 0.0)) if rounds else 0.0
    checkpoints = paths.get("checkpoints")
    summary["checkpoint_bytes"] = _folder_bytes(checkpoints) if checkpoints else 0
    summary["paths"] = {name: str(Path(path).resolve()) for name, path in paths.items()
                        if path is not None}
    return summary


def _privacy_spent(rounds: list[dict[str, Any]], sites: Mapping[str, str]) -> dict[str, Any]:
    per_site: dict[str, dict[str, float]] = {}
    user_level: dict[str, float] = {}
    for record in rounds:
        for node, epsilon in record.get("epsilon_per_client", {}).items():
            per_site.setdefault(sites.get(str(node), str(node)), {})["epsilon"] = float(epsilon)
        for node, delta in record.get("delta_per_client", {}).items():
            per_site.setdefault(sites.get(str(node), str(node)), {})["delta"] = float(delta)
        if "user_level_epsilon" in record:
            user_level = {"epsilon": float(record["user_level_epsilon"]),
                          "delta": float(record.get("user_level_delta", 0.0))}
    privacy: dict[str, Any] = {}
    if per_site:
        privacy["per_site"] = per_site
    if user_level:
        privacy["user_level"] = user_level
    return privacy


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _node_order(node: str) -> tuple[int, Any]:
    return (0, int(node)) if str(node).isdigit() else (1, str(node))


def _flat_scalars(record: dict[str, Any], sites: Mapping[str, str],
                  prefix: str = "") -> dict[str, float]:
    scalars: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{sites.get(str(key), key) if prefix else key}"
        if isinstance(value, bool) or key == "round":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            scalars[name] = float(value)
        elif isinstance(value, dict):
            scalars.update(_flat_scalars(value, sites, prefix=f"{name}/"))
    return scalars


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
