"""Everything a run leaves on disk, in its own folder.

``config.json``      the resolved run config
``metrics.jsonl``    one JSON object per round (round 0 = the initial model)
``tensorboard/``     the same scalars for TensorBoard
``plot.png``         accuracy and loss over rounds, redrawn after every round
``model/``           the final global model, ``save_pretrained`` (model + tokenizer)
``privacy.json``     what each site's data is guaranteed (``server/privacy_statement.py``)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class RunOutput:
    def __init__(self, folder: Path, config: dict[str, Any]):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = folder / "metrics.jsonl"
        self.plot_path = folder / "plot.png"
        self.model_path = folder / "model"
        _write_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True))
        self._rounds: list[dict[str, Any]] = []
        self._writer = None

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self._rounds)

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Start from metrics recorded before (resume); rewrites the file to match."""
        self._rounds = list(rounds)
        _write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rounds))

    def record_round(self, record: dict[str, Any]) -> None:
        self._rounds.append(record)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._tensorboard(record)
        self.plot()

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder / "tensorboard"))
        step = int(record["round"])
        for key, value in _flat_scalars(record).items():
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
            _plot_privacy(privacy_axis[0], private)
        figure.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        figure.savefig(tmp, dpi=100)
        plt.close(figure)
        os.replace(tmp, self.plot_path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plot_privacy(axis, rounds: list[dict[str, Any]]) -> None:
    """Cumulative ε per client (sample-level DP-SGD) and user-level ε, by round."""
    clients = sorted({node for r in rounds for node in r.get("epsilon_per_client", {})})
    for node in clients:
        points = [(r["round"], r["epsilon_per_client"][node]) for r in rounds
                  if node in r.get("epsilon_per_client", {})]
        axis.plot(*zip(*points), marker="o", label=f"client {node}")
    user_level = [(r["round"], r["user_level_epsilon"]) for r in rounds if "user_level_epsilon" in r]
    if user_level:
        axis.plot(*zip(*user_level), marker="s", linestyle="--", color="black",
                  label="user-level")
    axis.set_xlabel("round")
    axis.set_title("privacy spent (cumulative ε)")
    axis.legend(fontsize="small")


def _flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    scalars: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or key == "round":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            scalars[name] = float(value)
        elif isinstance(value, dict):
            scalars.update(_flat_scalars(value, prefix=f"{name}/"))
    return scalars


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
