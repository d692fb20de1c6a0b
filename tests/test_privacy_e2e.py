"""End to end on Flower's simulation engine: DP-SGD on every client with per-site budgets,
user-level DP on the aggregate, tiny BERT on real SST-2.

Three sites, four planned rounds. Site 1's budget affords one round and site 2's two
(given through the simulation-only ``dp-simulated-site-policy``). Site 1 refuses round 2
and the run goes on with two; site 2 refuses round 3, which leaves one site, fewer than
``min-train-nodes``: the run ends cleanly after round 3 with its outputs and model.
"""

from __future__ import annotations

import logging

import dp_accounting
import pytest
from dp_accounting import rdp
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from transformers import AutoModelForSequenceClassification

from tests.conftest import read_metrics


def epsilon_curve(sigma: float, sample_rate: float, steps_per_round: int, rounds: int):
    logging.getLogger("absl").setLevel(logging.ERROR)
    curve = []
    for r in range(1, rounds + 1):
        accountant = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(sigma)), steps_per_round * r)
        curve.append(float(accountant.get_epsilon(1e-5)))
    return curve


def test_sites_stop_at_their_budgets_and_the_run_records_every_clients_epsilon(run_simulation):
    # TINY_RUN's 160 examples over 3 IID partitions: 54, 53, 53 -> 4 Poisson batches of
    # rate 1/4 per round for each site, 16 planned steps
    sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.25,
                                 steps=16, accountant="rdp")
    e = epsilon_curve(sigma, 0.25, 4, 4)
    budget_1, budget_2 = (e[0] + e[1]) / 2, (e[1] + e[2]) / 2
    folder = run_simulation({
        "num-server-rounds": 4, "min-train-nodes": 2, "min-available-nodes": 3,
        "dp-sgd": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5,
        "dp-simulated-site-policy": f"1: dp-max-epsilon={budget_1}; 2: dp-max-epsilon={budget_2}",
        "user-dp": "client-adaptive", "user-dp-noise-multiplier": 1.0,
        "user-dp-clipped-count-stddev": 1.0,
    }, num_supernodes=3, name="dp")

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    first, second, third = rounds[1:]

    assert (first["clients"], first["refused"]) == (3, 0)
    assert len(first["epsilon_per_client"]) == 3
    assert all(eps == pytest.approx(e[0], rel=1e-3) for eps in first["epsilon_per_client"].values())

    assert (second["clients"], second["refused"]) == (2, 1) and not second.get("skipped")
    [(site_1, refusal)] = second["refusals"].items()
    assert refusal["code"] == "budget-exhausted" and "dp-max-epsilon" in refusal["reason"]
    assert second["epsilon_per_client"][site_1] == pytest.approx(e[0], rel=1e-3)
    assert max(r["epsilon_per_client"][site_1] for r in rounds[1:]) <= budget_1
    trained = {k: v for k, v in second["epsilon_per_client"].items() if k != site_1}
    assert all(eps == pytest.approx(e[1], rel=1e-3) for eps in trained.values())

    assert (third["clients"], third["refused"], third["skipped"]) == (1, 2, True)
    [site_2] = set(third["refusals"]) - {site_1}
    assert third["refusals"][site_2]["code"] == "budget-exhausted"
    assert third["epsilon_per_client"][site_2] == pytest.approx(e[1], rel=1e-3)
    assert max(r["epsilon_per_client"][site_2] for r in rounds[1:]) <= budget_2
    assert sorted(third["sites_stopped"]) == sorted([site_1, site_2])
    assert "fewer than min-train-nodes 2" in third["run_stopped"]
    [site_0] = set(third["epsilon_per_client"]) - {site_1, site_2}
    assert third["epsilon_per_client"][site_0] == pytest.approx(e[2], rel=1e-3)

    # user-level ε: one Gaussian release of multiplier 1 in round 1, a weaker one in
    # round 2 (2 of 3 sampled replied), none in the skipped round 3
    opacus = RDPAccountant()
    opacus.history = [(1.0, 1.0, 1)]
    assert first["user_level_epsilon"] == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-3)
    assert second["user_level_epsilon"] > first["user_level_epsilon"]
    assert third["user_level_epsilon"] == second["user_level_epsilon"]

    assert (folder / "plot.png").stat().st_size > 10_000
    model = AutoModelForSequenceClassification.from_pretrained(str(folder / "model"))
    assert model.config.id2label == {0: "negative", 1: "positive"}
