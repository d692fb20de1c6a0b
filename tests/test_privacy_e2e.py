"""End to end on Flower's simulation engine: DP-SGD on every client with per-site lifetime
budgets, user-level DP on the aggregate, tiny BERT on real SST-2.

Three sites, two planned rounds. Site 0 has no budget and trains at the run's ε; site 2's
own budget (4, below the run's 8) sets its noise; site 1's ledger already holds an earlier
study whose ε passes its budget, so it refuses from round 1 on, and the run goes on with
the other two. Site policies come through the simulation-only
``dp-simulated-site-policy``. The run ends with a privacy statement per site.
"""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from transformers import AutoModelForSequenceClassification

from tests.conftest import read_metrics


def lifetime_epsilon(sigma: float, sample_rate: float, steps: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps), (20.0, 1.0, 1)]  # + the noisy count
    return accountant.get_epsilon(1e-5)


def test_sites_keep_their_budgets_and_the_run_states_every_sites_guarantee(run_simulation,
                                                                           tmp_path):
    ledgers = {site: tmp_path / f"site-{site}" for site in (1, 2)}
    ledgers[1].mkdir()
    (ledgers[1] / "ledger-earlier-study.json").write_text(json.dumps({
        "accountant": "rdp", "noise-multiplier": 0.6,
        "history": json.dumps([[0.6, 0.25, 400]])}))
    folder = run_simulation({
        "num-server-rounds": 2, "min-train-nodes": 2, "min-available-nodes": 3,
        "dp-sgd": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5,
        "dp-simulated-site-policy": (f"1: dp-max-epsilon=8 dp-state-dir='{ledgers[1]}'; "
                                     f"2: dp-max-epsilon=4 dp-state-dir='{ledgers[2]}'"),
        "user-dp": "client-adaptive", "user-dp-noise-multiplier": 1.0,
        "user-dp-clipped-count-stddev": 1.0,
    }, num_supernodes=3, name="dp")

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, second = rounds[1:]
    for record in (first, second):
        assert (record["clients"], record["refused"]) == (2, 1) and not record.get("skipped")
        assert "train_loss" not in record  # DP sites send no training loss
        assert record["examples"] >= 2  # noisy counts, each at least 1
    [(site_1, refusal)] = first["refusals"].items()
    assert refusal["code"] == "budget-exhausted" and "over all runs" in refusal["reason"]
    assert first["privacy_reports"][site_1]["steps"] == 400  # the earlier study, counted

    reports = second["privacy_reports"]
    [site_0, site_2] = sorted((set(reports) - {site_1}),
                              key=lambda node: reports[node]["max-epsilon"])
    assert reports[site_0]["max-epsilon"] == 0.0 and reports[site_2]["max-epsilon"] == 4.0
    for node, budget in ((site_0, 8.0), (site_2, 4.0)):
        report = reports[node]
        assert (report["sample-rate"], report["steps"]) == (0.25, 8)
        epsilon = lifetime_epsilon(report["noise-multiplier"], 0.25, 8)
        assert report["epsilon"] == pytest.approx(epsilon, rel=1e-9)
        assert budget - 0.02 <= epsilon <= budget  # calibrated to the run's ε or the site's
        assert first["privacy_reports"][node]["epsilon"] == pytest.approx(
            lifetime_epsilon(report["noise-multiplier"], 0.25, 4), rel=1e-9)
    assert json.loads((ledgers[2] / "privacy-ledger.json").read_text())["datasets"]

    statement = json.loads((folder / "privacy.json").read_text())
    assert set(statement["sites"]) == {site_0, site_1, site_2}
    site = statement["sites"][site_2]
    assert site["epsilon"] == reports[site_2]["epsilon"] and site["delta"] == 1e-5
    assert site["neighbours"] == "add/remove one training example of the site"
    assert "lifetime ledger" in site["scope"] and "within its cap ε = 4" in site["statement"]
    assert "this Flower run only" in statement["sites"][site_0]["scope"]
    assert statement["user_level"]["epsilon"] == second["user_level_epsilon"]
    assert "zero-out" in statement["user_level"]["neighbours"]
    assert any("evaluation" in line for line in statement["not_covered"])

    model = AutoModelForSequenceClassification.from_pretrained(str(folder / "model"))
    assert model.config.id2label == {0: "negative", 1: "positive"}
