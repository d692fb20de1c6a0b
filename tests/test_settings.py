"""The run config is parsed once, into one Settings object with a typed field per
section; every run-config section of the schema is one of its fields."""

from __future__ import annotations

import ast
import dataclasses
import tomllib

import pytest
from flwr.app import Context, RecordDict

from client.settings import run_settings
from sepal.config import ConfigError
from sepal.docs_reference import run_config_sections
from sepal.settings import Settings
from tests.conftest import PROJECT_ROOT


def _declared() -> dict:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_every_section_is_read_from_the_one_mapping():
    values = {"num-server-rounds": 7, "lora": True, "dp-sgd": True, "user-dp": "server-fixed",
              "upload-codec": "q8", "secure-aggregation": True, "strategy": "fedprox",
              "validation-norm-multiple": 3.0, "checkpoint-keep": 2}
    settings = Settings.from_mapping(values)
    assert settings.run.num_server_rounds == 7
    assert settings.lora.lora and settings.dp.dp_sgd and settings.secagg.enabled
    assert settings.user_dp.user_dp == "server-fixed"
    assert settings.compression.upload_codec == "q8"
    assert settings.strategy.strategy == "fedprox"
    assert settings.validation.validation_norm_multiple == 3.0
    assert settings.checkpoint.checkpoint_keep == 2
    for field in dataclasses.fields(settings):
        section = getattr(settings, field.name)
        assert section == type(section).from_mapping(values)


def test_the_pyproject_defaults_are_the_dataclass_defaults():
    declared = _declared()
    assert Settings.from_mapping(declared) == Settings.from_mapping({})
    assert sorted(Settings.keys()) == sorted(declared)


def test_every_schema_section_is_a_settings_field():
    outside = [cls for cls in run_config_sections() if cls not in Settings.sections().values()]
    assert outside == [], f"run-config sections outside Settings: {outside}"


def test_unknown_keys_are_named_once_each_with_the_closest_setting():
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"num-server-round": 3, "dp-sgdd": True, "zzz": 1})
    message = str(err.value)
    assert "'num-server-round' (did you mean 'num-server-rounds'?)" in message
    assert "'dp-sgdd' (did you mean 'dp-sgd'?)" in message
    assert "'zzz'" in message


def test_a_bad_value_names_its_key():
    with pytest.raises(ConfigError, match="'secagg-clip'"):
        Settings.from_mapping({"secagg-clip": float("inf")})


def _context(run_id: int, **run_config) -> Context:
    return Context(run_id=run_id, node_id=7, node_config={}, state=RecordDict(),
                   run_config=dict(run_config))


def test_the_client_app_parses_a_run_once():
    first = run_settings(_context(1, **{"seed": 3}))
    assert run_settings(_context(1, **{"seed": 3})) is first
    assert run_settings(_context(2, **{"seed": 3})) is not first
    assert run_settings(_context(1, **{"seed": 4})).run.seed == 4
    with pytest.raises(ConfigError, match="'lora-r'"):
        run_settings(_context(1, **{"lora-r": 0}))


def test_the_shared_schema_imports_neither_apps_nor_strategies():
    """Imports go one way: client -> sepal, server -> sepal and strategies."""
    offenders = []
    for path in sorted((PROJECT_ROOT / "sepal").rglob("*.py")):
        if path.name == "docs_reference.py":  # finds sections in every package by name
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(PROJECT_ROOT)}: {name}" for name in names
                          if name.split(".")[0] in ("server", "client", "strategies")]
    assert not offenders
