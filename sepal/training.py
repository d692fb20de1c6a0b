"""Local training and evaluation loops, shared by clients and the centralized baseline."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclasses.dataclass
class TrainStats:
    loss: float
    accuracy: float
    examples: int
    steps: int


@dataclasses.dataclass
class EvalStats:
    loss: float
    accuracy: float
    macro_f1: float
    examples: int


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
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    description: str = "train",
) -> TrainStats:
    """Run ``epochs`` passes; ``criterion`` may be a DP-aware loss (Opacus ghost clipping),
    ``extra_loss`` a regularizer on the model (FedProx's proximal term)."""
    criterion = criterion or torch.nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for epoch in range(epochs):
        batches = tqdm(loader, desc=f"{description} epoch {epoch + 1}/{epochs}",
                       disable=not progress_enabled(), leave=False)
        for batch in batches:
            labels = batch["labels"].to(device)
            if labels.numel() == 0:  # Poisson sampling can draw an empty batch
                continue
            logits = model(**{k: batch[k].to(device) for k in MODEL_INPUTS}).logits
            loss = criterion(logits, labels)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            total_loss += float(loss.detach()) * labels.numel()
            correct += int((logits.argmax(-1) == labels).sum())
            seen += labels.numel()
    return TrainStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, steps)


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
    return EvalStats(
        loss=total_loss / len(actual),
        accuracy=float((predicted == actual).mean()),
        macro_f1=macro_f1(actual, predicted, num_labels),
        examples=len(actual),
    )


def macro_f1(actual: np.ndarray, predicted: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over classes present in ``actual`` or ``predicted``."""
    scores = []
    for label in range(num_labels):
        true_pos = np.sum((predicted == label) & (actual == label))
        false_pos = np.sum((predicted == label) & (actual != label))
        false_neg = np.sum((predicted != label) & (actual == label))
        if true_pos + false_pos + false_neg == 0:
            continue
        scores.append(2 * true_pos / (2 * true_pos + false_pos + false_neg))
    return float(np.mean(scores)) if scores else 0.0
