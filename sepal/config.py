"""Typed view of a run's configuration (``[tool.flwr.app.config]`` + overrides).

Flower hands the ServerApp and ClientApp a flat ``dict`` of TOML scalars; this
module turns it into a frozen dataclass once, checking every value, so that a
bad setting stops the run at start-up with the key's name in the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


POOLINGS = ("auto", "cls", "mean")
TRAINABLE = ("all", "head")


class ConfigError(ValueError):
    """A run or node setting is missing, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "minilm"
    pooling: str = "auto"
    trainable: str = "all"
    dataset: str = "../shared/data/sst2"
    train_split: str = "train"
    test_split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    max_train_examples: int = 0
    max_test_examples: int = 0
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    fraction_evaluate: float = 0.0
    local_epochs: int = 1
    learning_rate: float = 5e-5
    batch_size: int = 16
    max_seq_length: int = 64
    seed: int = 42
    device: str = "auto"
    round_timeout: float = 3600.0
    output_dir: str = "outputs"
    run_name: str = ""
    export_quantized: bool = dataclasses.field(default=False, metadata={
        "help": "also write the int8 ONNX model for CPU serving (model-int8/) at the end of "
                "the run"})

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
        require(8 <= self.max_seq_length <= 512, "max-seq-length", "must be in [8, 512]")
        require(self.max_train_examples >= 0, "max-train-examples", "must be >= 0 (0 = all)")
        require(self.max_test_examples >= 0, "max-test-examples", "must be >= 0 (0 = all)")
        require(self.round_timeout > 0, "round-timeout", "must be > 0 seconds")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device",
                 f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
