"""A run's settings: the run config parsed once, one typed field per section.

Flower hands the ServerApp and the ClientApp the run config as one flat mapping of
TOML scalars; :meth:`Settings.from_mapping` reads every section from it once and
refuses a key no section declares, naming the closest setting. Each process builds
its ``Settings`` once (the ServerApp per run, the ClientApp per run id and run
config) and hands the sections down.

Layering: every run-config section lives in ``sepal/``, so that both apps read the
same schema. Imports go one way: ``client`` -> ``sepal``; ``server`` ->
``sepal``, ``strategies``; ``strategies`` -> ``sepal``. Nothing in ``sepal`` imports
``server``, ``client`` or ``strategies`` (the strategy registry stays in
``strategies``; only the section that names a strategy lives here). This module
imports no torch, so the ClientApp's secure-aggregation stages can read it cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping
from typing import Any

from sepal.checkpoint_config import CheckpointConfig
from sepal.codecs.config import CompressionConfig
from sepal.config import ConfigError, RunConfig
from sepal.lora import LoraConfig
from sepal.privacy.config import DPSGDConfig, UserLevelDPConfig
from sepal.secagg.config import SecAggConfig
from sepal.strategy_config import StrategyConfig
from sepal.validation_config import ValidationConfig

@dataclasses.dataclass(frozen=True)
class Settings:
    run: RunConfig
    lora: LoraConfig
    dp: DPSGDConfig
    user_dp: UserLevelDPConfig
    compression: CompressionConfig
    secagg: SecAggConfig
    strategy: StrategyConfig
    validation: ValidationConfig
    checkpoint: CheckpointConfig

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Every section of ``values`` (kebab-case keys; absent keys take their defaults).

        Raises ConfigError naming every key no section declares, or the first bad value.
        """
        check_known_keys(values)
        return cls(**{name: section.from_mapping(values)
                      for name, section in cls.sections().items()})

    @staticmethod
    @functools.cache
    def sections() -> dict[str, type]:
        """Field name -> section class, in field order."""
        return typing.get_type_hints(Settings)

    @classmethod
    def keys(cls) -> list[str]:
        """Every run-config key, in section order."""
        return [field.name.replace("_", "-") for section in cls.sections().values()
                for field in dataclasses.fields(section)]

    def as_dict(self) -> dict[str, Any]:
        """Every setting, snake_case name -> value (a run's ``config.json``)."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            values.update(dataclasses.asdict(getattr(self, field.name)))
        return values


def check_known_keys(values: Mapping[str, Any]) -> None:
    """ConfigError naming every key of ``values`` no section declares (Flower refuses them
    with only "Invalid run configuration"), each with the closest declared key."""
    declared = Settings.keys()
    unknown = sorted(set(values) - set(declared))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, declared, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"run config: unknown key(s) {', '.join(hints)}; the settings are "
                          "listed in docs/configuration.md ([tool.flwr.app.config] in "
                          "pyproject.toml)")
