"""The learning task both sides share: which data a node holds, how it is tokenized.

Loaded splits and tokenized datasets are cached per process: in simulation a Ray
actor serves many rounds and re-tokenizing every round would dominate small runs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from sepal.config import ConfigError, RunConfig, parse_section, require
from sepal.data import (TextSplit, TokenizedDataset, is_local, load_split,
                        partition, read_label_names)
from sepal.lora import LoraConfig
from sepal.model import build_model, load_tokenizer


@dataclasses.dataclass(frozen=True)
class NodeData:
    """Where a node's examples come from, read from its node config.

    ``data-path`` (deployment): the institution's own folder, used whole.
    ``partition-id`` / ``num-partitions`` (simulation, or tests): a share of the
    run's ``dataset`` cut by the configured partitioner.
    """

    CONFIG_SOURCE: ClassVar[str] = "node config"

    data_path: str = dataclasses.field(default="", metadata={
        "help": "The site's own CSV folder, used whole (deployment)."})
    partition_id: int = dataclasses.field(default=-1, metadata={
        "help": "Which share of the run's `dataset` this node trains on (simulation); -1 = none."})
    num_partitions: int = dataclasses.field(default=0, metadata={
        "help": "Number of shares the run's `dataset` is cut into (simulation); 0 = none."})

    def validate(self) -> None:
        require(bool(self.data_path) or self.num_partitions >= 1, "data-path",
                "is needed (the site's CSV folder), or 'partition-id' and 'num-partitions'",
                source="node config")

    @classmethod
    def from_mapping(cls, node_config: Mapping[str, Any]) -> NodeData:
        return parse_section(cls, node_config, source="node config")


@functools.lru_cache(maxsize=8)
def _cached_split(dataset: str, split: str, text_column: str, label_column: str) -> TextSplit:
    return load_split(dataset, split, text_column, label_column)


def node_split(cfg: RunConfig, node: NodeData, split: str) -> TextSplit:
    """The examples of ``split`` this node trains or evaluates on."""
    if node.data_path:
        return _cached_split(node.data_path, split, cfg.text_column, cfg.label_column)
    whole = _cached_split(cfg.dataset, split, cfg.text_column, cfg.label_column)
    limit = cfg.max_train_examples if split == cfg.train_split else cfg.max_test_examples
    whole = whole.head(limit, cfg.seed)
    return partition(whole, node.num_partitions, node.partition_id, cfg.partitioner,
                     cfg.dirichlet_alpha, cfg.seed)


def server_test_split(cfg: RunConfig) -> TextSplit:
    split = _cached_split(cfg.dataset, cfg.test_split, cfg.text_column, cfg.label_column)
    return split.head(cfg.max_test_examples, cfg.seed)


def run_label_names(cfg: RunConfig) -> list[str]:
    """The run's class names, as the server learns them: the dataset folder's
    ``label_names.json``, else the names its test split carries.

    The server needs no train split: a deployment's server folder may hold only the
    test set it evaluates on.
    """
    if is_local(cfg.dataset):
        names = read_label_names(Path(cfg.dataset).expanduser())
        if names is not None:
            return names
    return server_test_split(cfg).label_names


def run_train_size(cfg: RunConfig) -> int | None:
    """Examples in the run's train split, or None when the dataset has no such split
    (a deployment's server folder holding only the test set)."""
    folder = Path(cfg.dataset).expanduser()
    if is_local(cfg.dataset) and not (folder / f"{cfg.train_split}.csv").exists():
        return None
    return len(centralized_train_split(cfg))


def centralized_train_split(cfg: RunConfig) -> TextSplit:
    split = _cached_split(cfg.dataset, cfg.train_split, cfg.text_column, cfg.label_column)
    return split.head(cfg.max_train_examples, cfg.seed)


@functools.lru_cache(maxsize=8)
def tokenized_node_split(cfg: RunConfig, node: NodeData, split: str) -> TokenizedDataset:
    return TokenizedDataset(node_split(cfg, node, split), load_tokenizer(cfg.model),
                            cfg.max_seq_length)


@functools.lru_cache(maxsize=2)
def tokenized_server_test_split(cfg: RunConfig) -> TokenizedDataset:
    return TokenizedDataset(server_test_split(cfg), load_tokenizer(cfg.model), cfg.max_seq_length)


def build_task_model(cfg: RunConfig, label_names: list[str],
                     lora: LoraConfig | None = None) -> torch.nn.Module:
    """The run's classifier as every side builds it: model, pooling, what is trainable,
    and LoRA adapters when the run asks for them."""
    if lora is not None and lora.lora and cfg.trainable != "all":
        raise ConfigError(f"run config 'trainable' {cfg.trainable!r} and 'lora' true both say "
                          "what is trained: LoRA trains adapters + head; use trainable 'all'")
    model = build_model(cfg.model, label_names, cfg.seed, cfg.pooling, cfg.trainable)
    return lora.apply(model) if lora is not None else model
