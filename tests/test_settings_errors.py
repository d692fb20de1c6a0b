"""Every bad setting stops the run at start-up with an error naming its key."""

from __future__ import annotations

import pytest

from sepal.codecs import CompressionConfig
from sepal.config import ConfigError, RunConfig
from sepal.model import ModelError, resolve_device
from sepal.secagg.config import SecAggConfig
from sepal.settings import Settings
from sepal.strategy_config import StrategyConfig
from sepal.validation_config import ValidationConfig

CASES = [
    (RunConfig, {"num-server-rounds": float("inf")}, "num-server-rounds"),
    (RunConfig, {"learning-rate": float("nan")}, "learning-rate"),
    (RunConfig, {"round-timeout": float("inf")}, "round-timeout"),
    (RunConfig, {"device": "cudafoo"}, "device"),
    (RunConfig, {"device": "cuda:"}, "device"),
    (RunConfig, {"run-name": "../../x"}, "run-name"),
    (RunConfig, {"run-name": "a/b"}, "run-name"),
    (RunConfig, {"run-name": ".."}, "run-name"),
    (CompressionConfig, {"upload-codec": "topk:inf"}, "upload-codec"),
    (CompressionConfig, {"upload-codec": "q8:\u00b2"}, "upload-codec"),
    (CompressionConfig, {"upload-codec": "q\u00b2"}, "upload-codec"),
    (SecAggConfig, {"secagg-clip": float("inf")}, "secagg-clip"),
    (ValidationConfig, {"validation-clip-bound": float("inf")}, "validation-clip-bound"),
    (ValidationConfig, {"max-site-examples": 0}, "max-site-examples"),
    (ValidationConfig, {"max-site-examples": 2**40}, "max-site-examples"),
    (StrategyConfig, {"strategy": "fedadam", "strategy-params": "eta=nan"}, "strategy-params"),
    (StrategyConfig, {"strategy": "fedavgm", "strategy-params": "server-learning-rate=inf"},
     "strategy-params"),
]


@pytest.mark.parametrize("section, values, key", CASES,
                         ids=[f"{k}={list(v.values())[-1]}" for _, v, k in CASES])
def test_bad_setting_names_its_key(section, values, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        section.from_mapping(values)


def test_good_settings_still_parse():
    cfg = RunConfig.from_mapping({"device": "cuda:1", "run-name": "trial-2.b_c"})
    assert (cfg.device, cfg.run_name) == ("cuda:1", "trial-2.b_c")
    assert ValidationConfig.from_mapping({}).max_site_examples == 100_000


def test_a_node_device_outside_auto_cpu_cuda_is_refused():
    with pytest.raises(ModelError, match="cudafoo"):
        resolve_device("cudafoo")


def test_a_key_flower_would_refuse_is_named_with_the_closest_setting():
    with pytest.raises(ConfigError, match=r"'num-server-round' \(did you mean "
                                          r"'num-server-rounds'\?\)"):
        Settings.from_mapping({"num-server-round": 3, "seed": 1})
    assert Settings.from_mapping({"num-server-rounds": 3}).run.num_server_rounds == 3
