"""Local training on a node: seeded, deterministic, reports what it did."""

from __future__ import annotations

import numpy as np
import torch

from client.local_training import LocalTraining
from sepal.config import RunConfig
from sepal.model import build_model, get_weights
from sepal.task import NodeData
from tests.conftest import TINY_RUN


def _train_once(cfg, node, server_round):
    labels = ["negative", "positive"]
    initial = get_weights(build_model(cfg.model, labels, cfg.seed))
    training = LocalTraining(cfg, node, labels, torch.device("cpu"))
    stats = training.run(initial, server_round)
    return stats, training.local_weights(), initial


def test_same_seed_same_round_gives_identical_weights(sst2):
    cfg = RunConfig.from_mapping({**TINY_RUN, "max-train-examples": 64})
    node = NodeData(partition_id=0, num_partitions=2)
    first_stats, first, initial = _train_once(cfg, node, server_round=1)
    second_stats, second, _ = _train_once(cfg, node, server_round=1)
    assert first_stats.examples_in_split == 32 and first_stats.steps == 2
    assert first_stats.loss == second_stats.loss
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert any(not np.array_equal(first[k], initial[k]) for k in first)

    _, other_round, _ = _train_once(cfg, node, server_round=2)
    assert any(not np.array_equal(first[k], other_round[k]) for k in first)
