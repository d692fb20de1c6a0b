"""Strategies by name: parameters, the entry-point plug-in mechanism, sound compositions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from flwr.serverapp.strategy import FedAdam, FedProx, Krum

from sepal.config import ConfigError
from sepal.settings import Settings
from server.app import serve
from server.checkpoint import read_checkpoint
from sepal.strategy_config import StrategyConfig
from strategies import (
    StrategyError,
    available_strategies,
    build_strategy,
    strategy_traits,
)
from strategies.builtin import FACTORIES
from strategies.compatibility import (
    ADAPTIVE_CLIPPING,
    CENTRAL_DP,
    COMPRESSION,
    SECURE_AGGREGATION,
    SERVER_SIDE_CLIPPING,
    CompositionError,
    active_wrappers,
    check_composition,
)
from sepal.strategy_config import parse_params
from testing.grid import app_run_config, sepal_grid, server_context
from tests.conftest import PROJECT_ROOT, read_metrics
from tests.inprocess_grid import TINY_INPROCESS, run_inprocess


def wrappers_of(run_config: dict) -> list:
    return active_wrappers(Settings.from_mapping(run_config))

EXAMPLE_PLUGIN = PROJECT_ROOT / "examples" / "sepal-strategy-example"
COMMON = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 2,
          "min_evaluate_nodes": 0, "min_available_nodes": 2}
MEANS = {"fedavg", "fedprox"}
SERVER_OPTIMIZERS = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}
ROBUST = {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"}


def test_strategy_params_are_read_as_typed_keyword_arguments():
    assert parse_params("eta=0.001, beta-1=0.9 tau=1e-9") == {"eta": 0.001, "beta_1": 0.9,
                                                              "tau": 1e-9}
    assert parse_params("rule='krum', flag=true, n=3 , word=plain") == {
        "rule": "krum", "flag": True, "n": 3, "word": "plain"}
    assert parse_params("  ") == {}
    for bad, why in [("eta", "cannot read 'eta'"), ("eta=1, eta=2", "'eta' is given twice")]:
        with pytest.raises(ConfigError, match=f"'strategy-params'.*{why}"):
            StrategyConfig.from_mapping({"strategy-params": bad})


def test_builtins_wrap_flower_classes_with_their_parameters():
    assert set(FACTORIES) == MEANS | SERVER_OPTIMIZERS | ROBUST
    adam = build_strategy("fedadam", {"beta_1": 0.5}, COMMON)
    assert type(adam) is FedAdam and (adam.eta, adam.beta_1, adam.tau) == (1e-3, 0.5, 1e-3)
    assert build_strategy("fedprox", {}, COMMON).proximal_mu == 1.0
    assert type(build_strategy("fedprox", {}, COMMON)) is FedProx
    krum = build_strategy("krum", {"num_malicious_nodes": 1}, {**COMMON, "min_train_nodes": 4})
    assert type(krum) is Krum and krum.num_malicious_nodes == 1 and krum.min_train_nodes == 4
    assert set(FACTORIES["fedadam"].parameters()) == {"eta", "beta_1", "beta_2", "tau"}
    assert set(FACTORIES["fedtrimmedavg"].parameters()) == {"beta"}


@pytest.mark.parametrize("name, params, message", [
    ("fedadam", {"etaa": 0.1}, "'etaa' is not a parameter of FedAdam \\(it takes: eta, beta-1"),
    ("fedadam", {"eta": "fast"}, "'eta' must be a float, got 'fast'"),
    ("krum", {"num_malicious_nodes": 1.5}, "'num-malicious-nodes' must be a int"),
    ("fedavg", {"eta": 0.1}, "it takes: none"),
    ("fedtrimmedavg", {"beta": 0.7}, "beta"),  # Flower's own range check
])
def test_bad_strategy_params_fail_naming_the_key(name, params, message):
    with pytest.raises(StrategyError, match=f"'strategy-params' for strategy '{name}': .*{message}"):
        build_strategy(name, params, COMMON)


def test_unknown_strategy_lists_what_is_available():
    with pytest.raises(StrategyError, match="unknown strategy 'fedavgg'; available: .*'fedavg'"):
        build_strategy("fedavgg", {}, COMMON)


def test_wrappers_compose_only_where_sound():
    for name in FACTORIES:
        traits = strategy_traits(name)
        check_composition(name, traits, [COMPRESSION])
        if name in ROBUST:
            with pytest.raises(CompositionError, match="reveals only the sum.*needs each client"):
                check_composition(name, traits, [COMPRESSION, SECURE_AGGREGATION])
            with pytest.raises(CompositionError, match="sensitivity to one client is larger"):
                check_composition(name, traits, [CENTRAL_DP])
        else:
            check_composition(name, traits, [COMPRESSION, SECURE_AGGREGATION])
        if name in SERVER_OPTIMIZERS:
            with pytest.raises(CompositionError, match="keeps server state"):
                check_composition(name, traits, [CENTRAL_DP])
        if name in MEANS:
            check_composition(name, traits, [SECURE_AGGREGATION, CENTRAL_DP])
    with pytest.raises(CompositionError, match="server-side-clipping cannot be combined with "
                                               "secure-aggregation"):
        check_composition("fedavg", strategy_traits("fedavg"),
                          [SECURE_AGGREGATION, SERVER_SIDE_CLIPPING])
    assert wrappers_of({}) == [COMPRESSION]
    assert wrappers_of({"secure-aggregation": True, "user-dp": "server-adaptive"}) == [
        COMPRESSION, SECURE_AGGREGATION, CENTRAL_DP, SERVER_SIDE_CLIPPING, ADAPTIVE_CLIPPING]


@pytest.mark.parametrize("unsound, message", [
    ({"strategy": "krum", "user-dp": "server-fixed"},  # a key the central-DP section owns
     "central-dp cannot wrap strategy 'krum'"),
    ({"secure-aggregation": True, "upload-codec": "topk:0.01"},
     "upload-codec 'topk:0.01' cannot be combined with secure-aggregation"),
])
def test_unsound_combination_stops_the_server_at_start_up(tmp_path, sst2, unsound, message):
    run_config = {**app_run_config({**TINY_INPROCESS, "dataset": str(sst2),
                                    "output-dir": str(tmp_path), "run-name": "unsound"}),
                  **unsound}
    grid = sepal_grid(run_config, 2, keep_messages=True)
    with pytest.raises(CompositionError, match=message):
        serve(grid, server_context(run_config))
    assert grid.sent == [] and not (tmp_path / "unsound").exists()


def test_plugin_installed_with_pip_is_found_by_name_and_runs(tmp_path, sst2, monkeypatch):
    source = tmp_path / "plugin-source"
    shutil.copytree(EXAMPLE_PLUGIN, source)  # pip builds in the source tree
    site = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert "centered-clip" not in available_strategies()

    monkeypatch.syspath_prepend(str(site))  # the interpreter now sees the installed package
    assert "centered-clip" in available_strategies()
    traits = strategy_traits("centered-clip")
    assert traits.needs_individual_updates and not traits.weighted_mean
    with pytest.raises(CompositionError, match="'centered-clip' cannot run behind secure-agg"):
        check_composition("centered-clip", traits, [SECURE_AGGREGATION])
    with pytest.raises(StrategyError, match="'centered-clip': .*unexpected keyword.*'radius'"):
        build_strategy("centered-clip", {"radius": 1.0}, COMMON)

    folder, _ = run_inprocess(tmp_path, {"strategy": "centered-clip",
                                         "strategy-params": "tau=0.5, iterations=2"})
    checkpoint = read_checkpoint(folder / "checkpoints" / "round-0002.ckpt")
    assert checkpoint.strategy[0]["class"] == "CenteredClipping"
    assert [r["clients"] for r in read_metrics(folder)[1:]] == [3, 3]
