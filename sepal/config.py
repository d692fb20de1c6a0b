"""Typed view of a run's configuration (``[tool.flwr.app.config]`` + overrides).

Flower hands the ServerApp and ClientApp a flat ``dict`` of TOML scalars; each
section of it is a frozen dataclass (this module's ``RunConfig`` is the run's own)
built by :func:`parse_section`, which checks every value, so that a bad setting stops
the run at start-up with the key's name in the message. ``sepal.settings`` reads all
the sections at once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any


POOLINGS = ("auto", "cls", "mean")
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
RUN_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}")
TRAINABLE = ("all", "head")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "linear")


class ConfigError(ValueError):
    """A run or node setting is missing, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = dataclasses.field(default="minilm", metadata={
        "help": "`minilm` (all-MiniLM-L6-v2, packaged, offline), `tiny-bert` (2 layers, hidden 64, "
                "random weights; tests), a local model folder, or a Hugging Face model id."})
    pooling: str = dataclasses.field(default="auto", metadata={
        "help": "Sentence representation the classifier reads: `cls` (BERT's pooler on [CLS]), "
                "`mean` (attention-masked mean of the last hidden states), or `auto` (`mean` when "
                "the model folder asks for mean tokens, as `minilm` does; else `cls`)."})
    trainable: str = dataclasses.field(default="all", metadata={
        "help": "What is fine-tuned and exchanged: `all` parameters, or `head` (the classifier on "
                "the frozen encoder). With `lora = true` keep `all`."})
    dataset: str = dataclasses.field(default="../shared/data/sst2", metadata={
        "help": "A folder of `<split>.csv` files (columns `text,label`, optional "
                "`label_names.json`) or, online, a Hugging Face dataset id; the server evaluates on"
                " its test split, simulations partition its train split."})
    train_split: str = dataclasses.field(default="train", metadata={
        "help": "Name of the training split (the CSV file stem, or the hub split)."})
    test_split: str = dataclasses.field(default="test", metadata={
        "help": "Name of the split the server evaluates the global model on."})
    text_column: str = dataclasses.field(default="text", metadata={
        "help": "Column that holds the text."})
    label_column: str = dataclasses.field(default="label", metadata={
        "help": "Column that holds the integer label (0 to K-1)."})
    max_train_examples: int = dataclasses.field(default=0, metadata={
        "help": "Train on a fixed, seeded subset of this many examples of `dataset` (0 = all); a "
                "site's own `data-path` is always used whole."})
    max_test_examples: int = dataclasses.field(default=0, metadata={
        "help": "Evaluate on a fixed, seeded subset of this many test examples (0 = all)."})
    partitioner: str = dataclasses.field(default="iid", metadata={
        "help": "How a simulation splits `dataset` among its sites: `iid` or `dirichlet` (label "
                "skew)."})
    dirichlet_alpha: float = dataclasses.field(default=0.5, metadata={
        "help": "Concentration of the Dirichlet partitioner; smaller means more label skew."})
    num_server_rounds: int = dataclasses.field(default=3, metadata={
        "help": "Number of federated rounds."})
    fraction_train: float = dataclasses.field(default=1.0, metadata={
        "help": "Fraction of the connected sites sampled to train each round, in (0, 1]."})
    min_train_nodes: int = dataclasses.field(default=2, metadata={
        "help": "Fewest sites a round samples; a round with fewer valid updates keeps the global "
                "model."})
    min_available_nodes: int = dataclasses.field(default=2, metadata={
        "help": "Sites that must be connected before the first round starts."})
    fraction_evaluate: float = dataclasses.field(default=0.0, metadata={
        "help": "Fraction of sites that also evaluate the global model on their own test split (0 ="
                " server-side evaluation only)."})
    local_epochs: int = dataclasses.field(default=1, metadata={
        "help": "Passes over a site's data per round."})
    learning_rate: float = dataclasses.field(default=5e-5, metadata={
        "help": "Learning rate of the local optimizer on every site (of the encoder or the "
                "LoRA adapters when head-learning-rate is set)."})
    head_learning_rate: float = dataclasses.field(default=0.0, metadata={"help": (
        "Learning rate of the classifier head; 0 uses learning-rate. Under DP-SGD the "
        "freshly initialized head needs a much larger rate than the encoder or adapters.")})
    optimizer: str = dataclasses.field(default="adamw", metadata={"help": (
        "Local optimizer: 'adamw' or 'sgd' (with momentum).")})
    momentum: float = dataclasses.field(default=0.9, metadata={"help": (
        "Momentum of the 'sgd' optimizer, in [0, 1).")})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": (
        "Decoupled weight decay (adamw) or L2 penalty (sgd) of the local optimizer.")})
    lr_schedule: str = dataclasses.field(default="constant", metadata={"help": (
        "'constant', or 'linear': decays every learning rate linearly to zero over the "
        "whole run's planned local steps (all rounds), so later rounds take smaller steps.")})
    batch_size: int = dataclasses.field(default=16, metadata={
        "help": "Local batch size (the expected batch size under DP-SGD's Poisson sampling)."})
    physical_batch_size: int = dataclasses.field(default=0, metadata={"help": (
        "Examples per forward/backward pass; a larger (logical) batch-size is accumulated "
        "over several passes and makes one optimizer step (under DP-SGD: one noisy step, "
        "accounted once). 0 = the whole batch in one pass. Bounds memory, not the result.")})
    max_seq_length: int = dataclasses.field(default=64, metadata={
        "help": "Tokens kept per example, 8 to 512; batches are padded to their longest example."})
    seed: int = dataclasses.field(default=42, metadata={
        "help": "Seeds model initialisation, subsets, partitions and each site's shuffling."})
    device: str = dataclasses.field(default="auto", metadata={
        "help": "`auto` (CUDA when present), `cpu` or `cuda[:N]`; a site may pin its own with node "
                "config `device`."})
    round_timeout: float = dataclasses.field(default=3600.0, metadata={
        "help": "Seconds the server waits for a round's replies; a site that answers later is "
                "counted as timed out."})
    output_dir: str = dataclasses.field(default="outputs", metadata={
        "help": "Folder in which each run writes its own folder of outputs."})
    run_name: str = dataclasses.field(default="", metadata={
        "help": "Name of the run's output folder and of its checkpoints (empty = a timestamp and "
                "the Flower run id); needed to resume."})
    export_quantized: bool = dataclasses.field(default=False, metadata={
        "help": "Also write the int8 ONNX model for CPU serving (model-int8/) at the end of "
                "the run."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(self.pooling in POOLINGS, "pooling",
                f"must be one of {POOLINGS}, got {self.pooling!r}")
        require(self.trainable in TRAINABLE, "trainable",
                f"must be one of {TRAINABLE}, got {self.trainable!r}")
        require(self.partitioner in ("iid", "dirichlet"), "partitioner",
                 f"must be 'iid' or 'dirichlet', got {self.partitioner!r}")
        require(self.dirichlet_alpha > 0, "dirichlet-alpha", "must be > 0")
        require(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        require(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        require(0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate", "must be in [0, 1]")
        require(self.min_train_nodes >= 1, "min-train-nodes", "must be >= 1")
        require(self.min_available_nodes >= self.min_train_nodes, "min-available-nodes",
                 "must be >= min-train-nodes")
        require(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        require(self.learning_rate > 0, "learning-rate", "must be > 0")
        require(self.batch_size >= 1, "batch-size", "must be >= 1")
        require(self.physical_batch_size >= 0, "physical-batch-size",
                "must be >= 0 (0 = the whole batch in one pass)")
        require(math.isfinite(self.learning_rate), "learning-rate", "must be finite")
        require(math.isfinite(self.head_learning_rate) and self.head_learning_rate >= 0,
                "head-learning-rate", "must be >= 0 and finite (0 = learning-rate)")
        require(self.optimizer in OPTIMIZERS, "optimizer",
                f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        require(0.0 <= self.weight_decay < 1.0, "weight-decay", "must be in [0, 1)")
        require(self.lr_schedule in LR_SCHEDULES, "lr-schedule",
                f"must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        require(8 <= self.max_seq_length <= 512, "max-seq-length", "must be in [8, 512]")
        require(self.max_train_examples >= 0, "max-train-examples", "must be >= 0 (0 = all)")
        require(self.max_test_examples >= 0, "max-test-examples", "must be >= 0 (0 = all)")
        require(self.round_timeout > 0, "round-timeout", "must be > 0 seconds")
        require(bool(DEVICE.fullmatch(self.device)), "device",
                 f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        require(self.run_name == "" or bool(RUN_NAME.fullmatch(self.run_name)), "run-name",
                "must be a plain folder name (letters, digits, '.', '_', '-'; no path "
                f"separators, not '.' or '..'), got {self.run_name!r}")


def parse_section(cls: type, values: Mapping[str, Any], source: str = "run config") -> Any:
    """Build the dataclass ``cls`` from a kebab-case mapping and validate it.

    Each subsystem (privacy, compression, secure aggregation, ...) declares its own
    frozen dataclass with a ``validate()`` method and reads its keys from the same
    flat run config; keys it does not declare are ignored.
    """
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        key = field.name.replace("_", "-")
        if key in values:
            kwargs[field.name] = _coerce(f"{source} '{key}'", values[key], field.type)
    section = cls(**kwargs)
    section.validate()
    return section


def require(ok: bool, key: str, why: str, source: str = "run config") -> None:
    """Raise a ConfigError naming ``key`` (of ``source``: run or node config) unless ``ok``."""
    if not ok:
        raise ConfigError(f"{source} '{key}' {why}")


def _coerce(where: str, value: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
