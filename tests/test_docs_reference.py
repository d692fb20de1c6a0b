"""The configuration reference (docs/configuration.md) is generated from the config
dataclasses; it, the dataclasses and pyproject's declared run-config keys agree."""

from __future__ import annotations

import dataclasses
import tomllib

from sepal.docs_reference import (config_sections, help_text, key, node_config_sections,
                                  render, run_config_sections)
from tests.conftest import PROJECT_ROOT


def _declared() -> dict:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_configuration_page_is_the_generated_reference():
    page = (PROJECT_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == render(), ("docs/configuration.md is out of date: run "
                              "`python -m sepal.docs_reference > docs/configuration.md`")


def test_every_setting_has_help():
    missing = [f"{cls.__name__}.{field.name}" for cls in config_sections()
               for field in dataclasses.fields(cls) if not help_text(field)]
    assert not missing, f"fields without metadata={{'help': ...}}: {missing}"


def test_discovery_finds_the_run_and_node_sections():
    run = {cls.__name__ for cls in run_config_sections()}
    node = {cls.__name__ for cls in node_config_sections()}
    assert {"RunConfig", "CompressionConfig", "DPSGDConfig", "UserLevelDPConfig",
            "LoraConfig", "SecAggConfig", "CheckpointConfig", "StrategyConfig"} <= run
    assert {"NodeData", "SitePolicy"} <= node


def test_every_run_config_key_is_declared_in_pyproject_with_the_same_default():
    declared = _declared()
    keys = [key(field) for cls in run_config_sections() for field in dataclasses.fields(cls)]
    assert len(keys) == len(set(keys)), "a run-config key belongs to two sections"
    for cls in run_config_sections():
        for field in dataclasses.fields(cls):
            assert key(field) in declared, (
                f"{cls.__name__}.{field.name}: '{key(field)}' is not declared in "
                "[tool.flwr.app.config], so Flower refuses it")
            assert declared[key(field)] == field.default, (
                f"'{key(field)}': pyproject default {declared[key(field)]!r}, dataclass "
                f"default {field.default!r}")
    assert set(declared) <= set(keys), (
        f"declared but in no config section: {sorted(set(declared) - set(keys))}")
