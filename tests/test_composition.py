"""The composition rule on run configs: every refusal names both parties and why, and the
weighted-mean answer follows the strategy's traits and the wrappers."""

from __future__ import annotations

import pytest

from sepal.settings import Settings
from strategies import strategy_traits
from strategies.builtin import FACTORIES
from strategies.compatibility import (
    UNDECLARED,
    CompositionError,
    active_wrappers,
    aggregates_by_weighted_mean,
    check_composition,
)


def wrappers_of(run_config: dict) -> list:
    return active_wrappers(Settings.from_mapping(run_config))


ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
MEANS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
SECURE = {"secure-aggregation": True}


def check(strategy: str, run_config: dict) -> None:
    check_composition(strategy, strategy_traits(strategy), wrappers_of(run_config))


@pytest.mark.parametrize("strategy", ROBUST)
def test_strategies_that_read_each_update_are_refused_behind_secure_aggregation(strategy):
    with pytest.raises(CompositionError, match=f"strategy '{strategy}' cannot run behind "
                                               "secure-aggregation: .*reveals only the sum"):
        check(strategy, SECURE)
    check(strategy, {})


@pytest.mark.parametrize("strategy", MEANS)
def test_mean_strategies_run_behind_secure_aggregation(strategy):
    check(strategy, SECURE)


@pytest.mark.parametrize("user_dp, message", [
    ("server-fixed", "server-side-clipping cannot be combined with secure-aggregation: it clips "
                     "each client's update on the server"),
    ("server-adaptive", "server-side-clipping cannot be combined with secure-aggregation"),
    ("client-adaptive", "adaptive-clipping cannot be combined with secure-aggregation: it "
                        "counts the clients whose update was clipped"),
])
def test_user_level_dp_that_reads_each_reply_is_refused_with_secure_aggregation(user_dp, message):
    with pytest.raises(CompositionError, match=message):
        check("fedavg", {**SECURE, "user-dp": user_dp})
    check("fedavg", {"user-dp": user_dp})


def test_client_side_fixed_clipping_composes_with_secure_aggregation():
    check("fedavg", {**SECURE, "user-dp": "client-fixed"})
    check("fedprox", {**SECURE, "user-dp": "client-fixed", "upload-codec": "q8:256,zlib"})


@pytest.mark.parametrize("chain", ["topk:0.01", "ef,topk:0.001:global,q8", "topk:100:global"])
def test_per_client_top_k_is_refused_with_secure_aggregation(chain):
    with pytest.raises(CompositionError, match=f"upload-codec '{chain}' cannot be combined with "
                                               "secure-aggregation: .*top-k would lose"):
        check("fedavg", {**SECURE, "upload-codec": chain})
    check("fedavg", {"upload-codec": chain})


@pytest.mark.parametrize("chain", ["dense", "q8:256,zlib", "q4,ef"])
def test_dense_and_quantized_uploads_compose_with_secure_aggregation(chain):
    check("fedavg", {**SECURE, "upload-codec": chain})


def test_a_plugin_without_traits_runs_alone_only():
    wrappers = wrappers_of(SECURE)
    with pytest.raises(CompositionError, match="'my-plugin' cannot run behind secure-aggregation"):
        check_composition("my-plugin", UNDECLARED, wrappers)
    with pytest.raises(CompositionError, match="central-dp cannot wrap strategy 'my-plugin'"):
        check_composition("my-plugin", UNDECLARED, wrappers_of({"user-dp": "client-fixed"}))
    check_composition("my-plugin", UNDECLARED, wrappers_of({"upload-codec": "topk:0.1"}))


@pytest.mark.parametrize("strategy", sorted(FACTORIES))
def test_weighted_mean_follows_the_traits_and_the_wrappers(strategy):
    traits = strategy_traits(strategy)
    plain = aggregates_by_weighted_mean(traits, wrappers_of({}))
    assert plain == (strategy in MEANS)
    for run_config in (SECURE, {"user-dp": "client-fixed"}, {"upload-codec": "topk:0.01,q8"}):
        assert aggregates_by_weighted_mean(traits, wrappers_of(run_config)) == plain
    for user_dp in ("server-fixed", "server-adaptive", "client-adaptive"):
        assert not aggregates_by_weighted_mean(traits, wrappers_of({"user-dp": user_dp}))
    assert not aggregates_by_weighted_mean(UNDECLARED, wrappers_of({}))
