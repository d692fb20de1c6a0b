"""Local training and evaluation loops, shared by clients and the centralized baseline."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from opacus.optimizers import DPOptimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclasses.dataclass
class TrainStats:
    loss: float
    accuracy: float
    examples: int
    steps: int


@dataclasses.dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int = 0


@dataclasses.dataclass
class EvalStats:
    loss: float
    accuracy: float
    macro_f1: float
    examples: int
    per_class: list[ClassScores] = dataclasses.field(default_factory=list)

    @property
    def worst_recall(self) -> float:
        """The lowest recall over classes present in the evaluated split."""
        recalls = [scores.recall for scores in self.per_class if scores.support > 0]
        return min(recalls) if recalls else float("nan")

    def per_class_by_name(self, label_names: list[str]) -> dict[str, dict[str, float]]:
        return {name: {"precision": round(c.precision, 6), "recall": round(c.recall, 6),
                       "f1": round(c.f1, 6), "support": c.support}
                for name, c in zip(label_names, self.per_class)}


def progress_enabled() -> bool:
    """Progress bars only for a person at a terminal, never in CI or logs."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    criterion: Callable | None = None,
    description: str = "train",
    physical_batch_size: int = 0,
    schedule: LRScheduler | None = None,
) -> TrainStats:
    """Run ``epochs`` passes, one optimizer step per (logical) batch of ``loader``.

    ``criterion`` may be a DP-aware loss (Opacus ghost clipping). A batch larger than
    ``physical_batch_size`` runs in chunks: under DP-SGD every chunk's clipped per-example
    gradients are summed by Opacus and only the last chunk's step adds noise and counts
    for the accountant (``signal_skip_step``, as Opacus' ``BatchMemoryManager`` does);
    without DP the chunk losses are weighted by their share of the batch. ``schedule``
    advances once per logical batch, empty Poisson batches included.
    """
    criterion = criterion or torch.nn.CrossEntropyLoss()
    private = isinstance(optimizer, DPOptimizer)
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for epoch in range(epochs):
        batches = tqdm(loader, desc=f"{description} epoch {epoch + 1}/{epochs}",
                       disable=not progress_enabled(), leave=False)
        for batch in batches:
            size = batch["labels"].numel()
            if size == 0:  # Poisson sampling can draw an empty batch
                if schedule is not None:
                    with warnings.catch_warnings():  # a step the optimizer rightly skipped
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
                        schedule.step()
                continue
            chunks = physical_chunks(batch, physical_batch_size)
            optimizer.zero_grad(set_to_none=True)
            for index, chunk in enumerate(chunks):
                labels = chunk["labels"].to(device)
                logits = model(**{k: chunk[k].to(device) for k in MODEL_INPUTS if k in chunk}).logits
                loss = criterion(logits, labels)
                last = index == len(chunks) - 1
                if private:
                    loss.backward()
                    optimizer.signal_skip_step(do_skip=not last)
                    optimizer.step()
                    if not last:
                        optimizer.zero_grad(set_to_none=True)
                else:
                    (loss * (labels.numel() / size)).backward()
                    if last:
                        optimizer.step()
                total_loss += float(loss.detach()) * labels.numel()
                correct += int((logits.argmax(-1) == labels).sum())
                seen += labels.numel()
            steps += 1
            if schedule is not None:
                schedule.step()
    return TrainStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, steps)


def physical_chunks(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` in chunks of at most ``size`` examples (0 = one chunk), each sorted by
    length and trimmed to its longest example, which the attention mask makes exact.

    Not Opacus' ``BatchMemoryManager``: that one wraps only a DP optimizer's loader (the
    non-private path needs the same chunks) and does not trim each chunk's padding."""
    count = batch["labels"].numel()
    if size <= 0 or count <= size:
        return [batch]
    lengths = batch["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    chunks = []
    for start in range(0, count, size):
        rows = order[start:start + size]
        width = int(lengths[rows].max())
        chunks.append({key: (value[rows, :width] if value.dim() == 2 else value[rows])
                       for key, value in batch.items()})
    return chunks


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             num_labels: int) -> EvalStats:
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    total_loss, predictions, targets = 0.0, [], []
    for batch in loader:
        labels = batch["labels"].to(device)
        logits = model(**{k: batch[k].to(device) for k in MODEL_INPUTS}).logits
        total_loss += float(criterion(logits, labels))
        predictions.append(logits.argmax(-1).cpu().numpy())
        targets.append(labels.cpu().numpy())
    predicted = np.concatenate(predictions)
    actual = np.concatenate(targets)
    per_class = per_class_scores(actual, predicted, num_labels)
    return EvalStats(
        loss=total_loss / len(actual),
        accuracy=float((predicted == actual).mean()),
        macro_f1=macro_f1(per_class),
        examples=len(actual),
        per_class=per_class,
    )


def evaluation_record(stats: EvalStats, label_names: list[str]) -> dict:
    """The metrics a round record keeps of an evaluation on the test split."""
    return {"accuracy": stats.accuracy, "macro_f1": stats.macro_f1, "loss": stats.loss,
            "worst_class_recall": stats.worst_recall,
            "per_class": stats.per_class_by_name(label_names)}


def macro_f1(per_class: list[ClassScores]) -> float:
    """Unweighted mean of per-class F1 over classes present in the labels or predictions."""
    scores = [c.f1 for c in per_class if c.support or c.predicted]
    return float(np.mean(scores)) if scores else 0.0


def per_class_scores(actual: np.ndarray, predicted: np.ndarray,
                     num_labels: int) -> list[ClassScores]:
    """Precision, recall, F1 and support of every class (0.0 where undefined)."""
    scores = []
    for label in range(num_labels):
        true_pos = int(np.sum((predicted == label) & (actual == label)))
        predicted_pos = int(np.sum(predicted == label))
        support = int(np.sum(actual == label))
        precision = true_pos / predicted_pos if predicted_pos else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * true_pos / (predicted_pos + support) if predicted_pos + support else 0.0
        scores.append(ClassScores(precision, recall, f1, support, predicted_pos))
    return scores
