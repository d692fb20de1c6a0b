"""Every built-in strategy runs two rounds through the real ServerApp code and real clients.

Driven in-process (tests/inprocess_grid.py): the Flower runtime costs 40+ s per run
here, eleven runs would take minutes; the Flower runtime itself is exercised by the
simulation and deployment tests (the deployment resume test runs FedAdam).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from client.local_training import LocalTraining
from client.proximal import proximal_step
from sepal import wire
from sepal.config import RunConfig
from sepal.model import build_model, get_weights
from sepal.task import NodeData
from server.checkpoint import read_checkpoint
from tests.conftest import TINY_RUN, read_metrics
from tests.inprocess_grid import run_inprocess

# name -> (flwr class, strategy-params, state attributes it must carry after round 2)
BUILTINS = {
    "fedavg": ("FedAvg", "", ()),
    "fedprox": ("FedProx", "proximal-mu=0.5", ()),
    "fedavgm": ("FedAvgM", "server-momentum=0.5", ("current_arrays", "momentum_vector")),
    "fedadam": ("FedAdam", "eta=0.01", ("m_t", "v_t")),
    "fedyogi": ("FedYogi", "", ("m_t", "v_t")),
    "fedadagrad": ("FedAdagrad", "tau=1e-4", ("m_t", "v_t")),
    "fedmedian": ("FedMedian", "", ()),
    "fedtrimmedavg": ("FedTrimmedAvg", "beta=0.34", ()),
    "krum": ("Krum", "num-malicious-nodes=0", ()),
    "multikrum": ("MultiKrum", "num-nodes-to-select=2", ()),
    "bulyan": ("Bulyan", "", ()),
}
NODES = {"bulyan": 3, "fedmedian": 3, "fedtrimmedavg": 3}  # enough to differ from a mean; else 2


def _client_models(grid, server_round, global_weights):
    """Round ``server_round``'s client models (global + decoded update), by partition."""
    models = {}
    for reply in grid.replies:
        config = next(m for m in grid.sent if m.metadata.message_id ==
                      reply.metadata.reply_to_message_id).content[wire.CONFIG_KEY]
        if config["server-round"] == server_round:
            update = wire.record_to_arrays(reply.content[wire.UPDATE_KEY])
            models[grid.partition_of(reply.metadata.src_node_id)] = OrderedDict(
                (k, global_weights[k] + update[k]) for k in global_weights)
    return [models[p] for p in sorted(models)]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_strategy_runs_two_rounds(tmp_path, sst2, name):
    cls, params, state_attributes = BUILTINS[name]
    nodes = NODES.get(name, 2)
    folder, grid = run_inprocess(tmp_path, {"strategy": name, "strategy-params": params,
                                            "checkpoint-keep": 2}, num_nodes=nodes)

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients"] == nodes and r["rejected"] == 0 and "skipped" not in r
               for r in rounds[1:])
    first = read_checkpoint(folder / "checkpoints" / "round-0001.ckpt")
    last = read_checkpoint(folder / "checkpoints" / "round-0002.ckpt")
    assert last.strategy[0]["class"] == cls
    assert set(state_attributes) <= set(last.strategy[0]["attributes"])
    assert all(v.dtype == np.float32 for v in last.weights.values())  # FedOpt returns float64

    initial = get_weights(build_model("tiny-bert", ["negative", "positive"], 42))
    clients = _client_models(grid, 1, initial)
    assert len(clients) == nodes
    assert any(not np.array_equal(first.weights[k], initial[k]) for k in initial)
    if name == "fedavg":  # equal shares of data: the plain mean
        for key in initial:
            np.testing.assert_allclose(first.weights[key], np.mean([c[key] for c in clients], 0),
                                       rtol=1e-5, atol=1e-7)
    if name == "fedmedian":
        for key in initial:
            np.testing.assert_array_equal(first.weights[key],
                                          np.median([c[key] for c in clients], axis=0))
    if name == "krum":  # Krum picks one client's model as it is
        assert any(all(np.array_equal(first.weights[k], c[k]) for k in initial) for c in clients)
    if name == "fedprox":
        train_configs = [m.content[wire.CONFIG_KEY] for m in grid.sent]
        assert len(train_configs) == 4 and all(c["proximal-mu"] == 0.5 for c in train_configs)


def test_proximal_step_pulls_local_training_towards_the_global_model(sst2):
    cfg = RunConfig.from_mapping({**TINY_RUN, "max-train-examples": 160})
    node = NodeData(partition_id=0, num_partitions=2)
    labels = ["negative", "positive"]
    start = get_weights(build_model(cfg.model, labels, cfg.seed))

    def drift(mu):
        training = LocalTraining(cfg, node, labels, torch.device("cpu"))
        stats = training.run(start, server_round=1, proximal_mu=mu)
        assert stats.steps == 5
        local = training.local_weights()
        return float(np.sqrt(sum(np.sum((local[k] - start[k]) ** 2) for k in start)))

    assert drift(100.0) < 0.8 * drift(0.0)


def test_proximal_step_moves_each_weight_lr_mu_of_the_way_back():
    model = build_model("tiny-bert", ["a", "b"], 0)
    anchor = get_weights(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    proximal_step(model, anchor, mu=2.0)(optimizer, (), {})
    assert all(np.allclose(param.detach().numpy() - anchor[name], 0.01 * (1 - 0.1 * 2.0))
               for name, param in model.named_parameters())
