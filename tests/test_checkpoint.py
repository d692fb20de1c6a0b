"""Checkpoints: atomic and verified files, strategy state, RNG state, resume from the last good one."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
)
from safetensors.numpy import load_file

from sepal.config import ConfigError, RunConfig
from sepal.privacy import UserLevelDPConfig
from server.central_dp import UserLevelDP
from sepal.checkpoint_config import CheckpointConfig
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    Checkpointer,
    capture_rng,
    open_checkpoints,
    privacy_ledger,
    read_checkpoint,
    restore_rng,
    write_checkpoint,
)
from strategies.state import StrategyStateError, load_strategy_state, strategy_state
from tests.conftest import read_metrics
from tests.inprocess_grid import run_inprocess

RUN_CONFIG = {"seed": 42, "strategy": "fedadam", "num-server-rounds": 3}


def _checkpoint(server_round: int, rng=None) -> Checkpoint:
    weights = OrderedDict([("b.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
                           ("a.bias", np.array([np.float32(1e-38), -0.0], np.float32))])
    return Checkpoint(
        round=server_round, weights=weights,
        strategy=[{"class": "FedAdam", "attributes": {
            "m_t": {"kind": "arrays", "value": {"b.weight": np.full((2, 3), 0.5, np.float32)}}}}],
        rng=rng or capture_rng(),
        metrics=[{"round": 0, "accuracy": 0.5, "loss": float("nan"), "offenders": {}}],
        validator={"offences": {"7000000": 2}})


def test_checkpoint_round_trips_exactly(tmp_path):
    saved = _checkpoint(3)
    write_checkpoint(tmp_path / "round-0003.ckpt", saved)
    loaded = read_checkpoint(tmp_path / "round-0003.ckpt")
    assert loaded.round == 3 and list(loaded.weights) == ["b.weight", "a.bias"]
    assert all(np.array_equal(loaded.weights[k], v) and loaded.weights[k].dtype == v.dtype
               for k, v in saved.weights.items())
    assert np.array_equal(loaded.strategy[0]["attributes"]["m_t"]["value"]["b.weight"],
                          saved.strategy[0]["attributes"]["m_t"]["value"]["b.weight"])
    assert loaded.metrics[0]["accuracy"] == 0.5 and np.isnan(loaded.metrics[0]["loss"])
    assert loaded.validator == {"offences": {"7000000": 2}}
    assert loaded.rng["python"] == saved.rng["python"]  # tuples come back as tuples
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:20], "shorter than the header"),
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "checksum mismatch"),
    (lambda data: b"PK" + data[2:], "bad magic"),
])
def test_damaged_checkpoint_is_detected(tmp_path, damage, message):
    path = tmp_path / "round-0001.ckpt"
    write_checkpoint(path, _checkpoint(1))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
    checkpoints = Checkpointer(tmp_path, keep=2, run_config=RUN_CONFIG)
    for server_round in (1, 2, 3):
        checkpoints.save(_checkpoint(server_round))
    assert [p.name for p in checkpoints.existing()] == ["round-0003.ckpt", "round-0002.ckpt"]
    latest = tmp_path / "round-0003.ckpt"
    latest.write_bytes(latest.read_bytes()[:-1000])

    with caplog.at_level(logging.WARNING, logger="sepal.server"):
        assert checkpoints.latest().round == 2
    assert any("round-0003.ckpt is damaged" in r.message and "truncated" in r.message
               for r in caplog.records)

    (tmp_path / "round-0002.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        checkpoints.latest()


def test_resume_refuses_a_checkpoint_written_under_different_settings(tmp_path):
    Checkpointer(tmp_path, 2, RUN_CONFIG).save(_checkpoint(1))
    longer = Checkpointer(tmp_path, 2, {**RUN_CONFIG, "num-server-rounds": 5, "resume": True})
    assert longer.latest().round == 1  # more rounds, same run: fine
    with pytest.raises(CheckpointError, match="'seed' is 7 but was 42"):
        Checkpointer(tmp_path, 2, {**RUN_CONFIG, "seed": 7}).latest()


def test_a_run_is_identified_by_its_name(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), run_name="study")
    settings = CheckpointConfig(resume=True)
    with pytest.raises(ConfigError, match="'resume' needs 'run-name'"):
        open_checkpoints(settings, RunConfig(output_dir=str(tmp_path)), "20260101-run1", {})
    checkpoints, start = open_checkpoints(settings, cfg, "study", RUN_CONFIG)
    assert start is None and checkpoints.folder == tmp_path / "study" / "checkpoints"
    checkpoints.save(_checkpoint(1))
    assert open_checkpoints(settings, cfg, "study", RUN_CONFIG)[1].round == 1
    with pytest.raises(CheckpointError, match="set resume = true to continue it"):
        open_checkpoints(CheckpointConfig(), cfg, "study", RUN_CONFIG)
    assert open_checkpoints(CheckpointConfig(checkpoint_keep=0), cfg, "study", {}) == (None, None)


def test_a_dp_sgd_run_resumes_on_the_same_privacy_ledger(tmp_path):
    """DP-SGD runs can be resumed: clients charge ε to the ledger named by the run-name,
    and learn the round the run resumed at (1 with no checkpoint yet: a run killed in
    round 1 may have trained some sites)."""
    cfg = RunConfig(output_dir=str(tmp_path), run_name="study")
    dp_run = {**RUN_CONFIG, "dp-sgd": True}
    resume = CheckpointConfig(resume=True)
    checkpoints, start = open_checkpoints(resume, cfg, "study", dp_run)
    assert start is None
    assert privacy_ledger("study", CheckpointConfig(), None).to_config() == {
        "privacy-ledger": "study"}
    assert privacy_ledger("study", resume, None).to_config() == {
        "privacy-ledger": "study", "resumed-at-round": 1}
    checkpoints.save(_checkpoint(2))
    _, start = open_checkpoints(resume, cfg, "study", dp_run)
    assert privacy_ledger("study", resume, start).to_config() == {
        "privacy-ledger": "study", "resumed-at-round": 3}


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_strategy_state_of_flower_strategies_survives_a_checkpoint(tmp_path):
    def arrays(value):
        return {"w": np.full(3, value, np.float32)}

    adam = FedAdam()
    adam.m_t, adam.v_t = arrays(0.1), arrays(0.2)
    momentum = FedAvgM(server_momentum=0.9)
    momentum.current_arrays = ArrayRecord({"w": Array(np.full(3, 1.5, np.float32))})
    momentum.momentum_vector = [np.full(3, 0.3, np.float32)]
    adaptive = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.1, 2)
    adaptive.clipping_norm = 0.123
    accountant = RdpAccountant(PrivacyConfig(1e-5, 100, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=2,
                                            population_size=100), count=3)
    fixed = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 2, accountant=accountant)

    def user_level(mode):
        settings = UserLevelDPConfig(user_dp=mode, user_dp_noise_multiplier=0.1)
        return UserLevelDP(FedAvgM(server_momentum=0.9), settings, num_sampled_clients=2,
                           population=2)

    sepal_adaptive = user_level("server-adaptive")
    sepal_adaptive.wrapped.clipping_norm = 0.456
    sepal_adaptive.wrapped.strategy.momentum_vector = [np.full(3, 0.7, np.float32)]

    for strategy, fresh in [
        (sepal_adaptive, user_level("server-adaptive")),
        (adam, FedAdam()), (momentum, FedAvgM(server_momentum=0.9)),
        (adaptive, DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.1, 2)),
        (fixed, DifferentialPrivacyServerSideFixedClipping(
            FedAvg(), 1.0, 1.0, 2, accountant=RdpAccountant(accountant.config))),
    ]:
        checkpoint = _checkpoint(1)
        checkpoint.strategy = strategy_state(strategy)
        write_checkpoint(tmp_path / "round-0001.ckpt", checkpoint)
        load_strategy_state(fresh, read_checkpoint(tmp_path / "round-0001.ckpt").strategy)
        assert _same(strategy_state(fresh), strategy_state(strategy))

    assert adaptive.clipping_norm == 0.123
    restored = user_level("server-adaptive")
    load_strategy_state(restored, strategy_state(sepal_adaptive))
    assert restored.clipping_norm() == 0.456  # through UserLevelDP.wrapped
    assert np.array_equal(restored.wrapped.strategy.momentum_vector[0], np.full(3, 0.7, np.float32))
    assert fresh.accountant.num_releases == 3
    assert fresh.accountant.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    with pytest.raises(StrategyStateError, match="FedAdam, but this run's strategy is FedAvgM"):
        load_strategy_state(FedAvgM(), strategy_state(adam))


def test_rng_state_survives_a_checkpoint(tmp_path):
    write_checkpoint(tmp_path / "round-0001.ckpt", _checkpoint(1))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(read_checkpoint(tmp_path / "round-0001.ckpt").rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_after_a_torn_checkpoint_recomputes_the_same_model(tmp_path, sst2, caplog):
    settings = {"strategy": "fedadam", "strategy-params": "eta=0.01", "num-server-rounds": 2,
                "checkpoint-keep": 2}  # a fallback for the damaged newest checkpoint
    folder, _ = run_inprocess(tmp_path, settings, num_nodes=2)
    uninterrupted = load_file(str(folder / "model" / "model.safetensors"))
    expected = read_metrics(folder)
    latest = folder / "checkpoints" / "round-0002.ckpt"
    latest.write_bytes(latest.read_bytes()[:4096])  # torn on disk

    with caplog.at_level(logging.INFO, logger="sepal.server"):
        run_inprocess(tmp_path, {**settings, "resume": True}, num_nodes=2)
    assert any("round-0002.ckpt is damaged" in r.message for r in caplog.records)
    assert any("round-0001.ckpt (round 1 complete)" in r.message for r in caplog.records)

    # round 2 again, from round 1's model, FedAdam moments and RNG state: bit-identical
    resumed = load_file(str(folder / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    metrics = read_metrics(folder)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    assert [(r["accuracy"], r["loss"]) for r in metrics] == [(r["accuracy"], r["loss"])
                                                             for r in expected]
    assert read_checkpoint(latest).round == 2  # rewritten whole
