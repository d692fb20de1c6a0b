"""Datasets: a local folder of CSVs (how an institution brings its data) or a hub id.

A folder holds ``<split>.csv`` files with a text and a label column, and optionally
``label_names.json`` (a JSON list; label ``i`` is ``label_names[i]``). Every defect
stops loading with a :class:`DataError` that names the file and, where it applies,
the row (1-based, the header being row 1).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


LABEL = re.compile(r"-?[0-9]+")  # int() would also take '1_0', '+1' and non-ASCII digits
MAX_UNNAMED_CLASSES = 1000  # classes named "0", "1", ... when label_names.json is absent


class DataError(ValueError):
    """The dataset is missing, malformed or inconsistent."""


@dataclasses.dataclass
class TextSplit:
    """One split of a text-classification dataset, held in memory."""

    texts: list[str]
    labels: np.ndarray  # int64, values in [0, len(label_names))
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> TextSplit:
        indices = np.asarray(indices, dtype=np.int64)
        return TextSplit([self.texts[i] for i in indices], self.labels[indices],
                         self.label_names, self.source)

    def head(self, max_examples: int, seed: int) -> TextSplit:
        """A fixed, seeded subset of ``max_examples`` rows (0 keeps all)."""
        if max_examples <= 0 or max_examples >= len(self):
            return self
        order = np.random.default_rng(seed).permutation(len(self))[:max_examples]
        return self.subset(np.sort(order))


def is_local(dataset: str) -> bool:
    return Path(dataset).exists() or dataset.startswith((".", "/", "~"))


def load_split(dataset: str, split: str, text_column: str = "text",
               label_column: str = "label") -> TextSplit:
    """Load ``split`` of a local CSV folder or, online, of a Hugging Face dataset."""
    if is_local(dataset):
        return _load_csv_split(Path(dataset).expanduser(), split, text_column, label_column)
    return _load_hub_split(dataset, split, text_column, label_column)


def read_label_names(folder: Path) -> list[str] | None:
    path = folder / "label_names.json"
    if not path.exists():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: must be a JSON list of at least two label names")
    return names


def _load_csv_split(folder: Path, split: str, text_column: str, label_column: str) -> TextSplit:
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist")
    path = folder / f"{split}.csv"
    if not path.exists():
        present = sorted(p.name for p in folder.glob("*.csv"))
        raise DataError(f"{path}: split '{split}' not found (CSV files present: {present})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        row = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, row {row}: bytes are not valid UTF-8 ({err.reason})") from err
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    for column in (text_column, label_column):
        if column not in columns:
            raise DataError(f"{path}: column '{column}' missing (header has {columns})")
    label_names = read_label_names(folder)
    texts: list[str] = []
    labels: list[int] = []
    for record in reader:
        row = reader.line_num
        value, label = record.get(text_column), record.get(label_column)
        if value is None or label is None:
            raise DataError(f"{path}, row {row}: fewer fields than the header")
        if record.get(None):
            raise DataError(f"{path}, row {row}: more fields than the header has columns "
                            f"{columns} (a comma in a text that is not quoted?)")
        if not value.strip():
            raise DataError(f"{path}, row {row}: empty '{text_column}'")
        if not LABEL.fullmatch(label.strip()):
            raise DataError(f"{path}, row {row}: label {label!r} is not an integer "
                            "(ASCII digits only)")
        label_id = int(label)
        if label_id < 0 or (label_names is not None and label_id >= len(label_names)):
            bound = f"[0, {len(label_names)})" if label_names else ">= 0"
            raise DataError(f"{path}, row {row}: label {label_id} out of range {bound}")
        if label_names is None and label_id >= MAX_UNNAMED_CLASSES:
            raise DataError(f"{path}, row {row}: label {label_id} without label_names.json; "
                            f"labels >= {MAX_UNNAMED_CLASSES} need a label_names.json beside "
                            "the CSV files naming every class")
        texts.append(value)
        labels.append(label_id)
    if not texts:
        raise DataError(f"{path}: split '{split}' is empty")
    if label_names is None:
        label_names = [str(i) for i in range(max(labels) + 1)]
    return TextSplit(texts, np.asarray(labels, dtype=np.int64), label_names, str(path))


def _load_hub_split(dataset: str, split: str, text_column: str, label_column: str) -> TextSplit:
    import datasets

    try:
        hub_split = datasets.load_dataset(dataset, split=split)
    except Exception as err:  # datasets raises many types for "offline" and "not found"
        raise DataError(
            f"dataset '{dataset}' is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {err}). Offline, point 'dataset' (run "
            f"config) or 'data-path' (node config) at a local folder holding "
            f"{split}.csv with columns '{text_column},{label_column}' and optionally "
            f"label_names.json."
        ) from err
    for column in (text_column, label_column):
        if column not in hub_split.column_names:
            raise DataError(f"hub dataset '{dataset}' split '{split}': column '{column}' "
                            f"missing (has {hub_split.column_names})")
    feature = hub_split.features[label_column]
    label_names = list(getattr(feature, "names", []) or [])
    labels = np.asarray(hub_split[label_column], dtype=np.int64)
    if not label_names:
        label_names = [str(i) for i in range(int(labels.max()) + 1)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(label_names)))
    if bad.size:
        raise DataError(f"hub dataset '{dataset}' split '{split}', row {bad[0] + 1}: label "
                        f"{labels[bad[0]]} out of range [0, {len(label_names)})")
    return TextSplit(list(hub_split[text_column]), labels, label_names, f"{dataset}:{split}")


def partition(split: TextSplit, num_partitions: int, partition_id: int, method: str,
              alpha: float, seed: int) -> TextSplit:
    """The ``partition_id``-th share of ``split`` under flwr-datasets' partitioners."""
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    if method == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif method == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=0, self_balancing=False, shuffle=True, seed=seed,
        )
    else:
        raise DataError(f"unknown partitioner '{method}' (use 'iid' or 'dirichlet')")
    partitioner.dataset = HFDataset.from_dict(
        {"row": np.arange(len(split)), "label": split.labels}
    )
    try:
        rows = partitioner.load_partition(partition_id)["row"]
    except ValueError as err:  # flwr-datasets: e.g. more partitions than examples
        raise DataError(f"partition {partition_id} of {num_partitions} ({method}) of "
                        f"{split.source}: {err}") from err
    if len(rows) == 0:
        raise DataError(f"partition {partition_id} of {num_partitions} ({method}"
                        + (f", dirichlet-alpha {alpha}" if method == "dirichlet" else "")
                        + f") of {split.source} is empty: use fewer partitions, more "
                        "examples or a larger dirichlet-alpha")
    return split.subset(np.sort(np.asarray(rows, dtype=np.int64)))


def check_training_classes(split: TextSplit) -> None:
    """A federation's training split must hold at least two classes (with one, every
    model scores accuracy 1.0 and learns nothing)."""
    present = np.unique(split.labels)
    if present.size < 2:
        raise DataError(f"{split.source}: every example has label {int(present[0])}; a "
                        "classifier needs at least two classes")


def check_labels_within(split: TextSplit, label_names: list[str], what: str) -> None:
    """Every label of ``split`` is one of ``label_names`` (the training classes)."""
    outside = np.flatnonzero(split.labels >= len(label_names))
    if outside.size:
        raise DataError(f"{split.source}: label {int(split.labels[outside[0]])} of {what} is "
                        f"not one of the {len(label_names)} training classes {label_names}")


def check_site_label_names(folder: Path, label_names: list[str]) -> None:
    """A site's own label_names.json must list the federation's classes in its order:
    the same label number has to mean the same class on every side."""
    names = read_label_names(folder)
    if names is not None and names != list(label_names):
        raise DataError(f"{folder / 'label_names.json'} lists {names}, the federation's "
                        f"classes are {list(label_names)} (same names, same order)")


class TokenizedDataset(Dataset):
    def __init__(self, split: TextSplit, tokenizer, max_seq_length: int):
        encoded = tokenizer(split.texts, truncation=True, max_length=max_seq_length)
        self.input_ids = encoded["input_ids"]
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.input_ids[index], int(self.labels[index])


def collate(batch) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch.

    ``position_ids`` and ``token_type_ids`` are passed explicitly, per example and
    contiguous: Opacus' per-sample gradients need them (BERT's defaults are
    broadcast buffers with batch dimension 1; see shared notes on Opacus + BERT).
    """
    size = len(batch)
    length = max((len(ids) for ids, _ in batch), default=1)
    input_ids = torch.zeros((size, length), dtype=torch.long)
    attention_mask = torch.zeros((size, length), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "position_ids": torch.arange(length).expand(size, length).contiguous(),
        "labels": torch.as_tensor([label for _, label in batch], dtype=torch.long),
    }


def make_loader(dataset: TokenizedDataset, batch_size: int, shuffle: bool,
                seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=generator)
