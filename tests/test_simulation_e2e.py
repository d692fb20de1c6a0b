"""End to end on Flower's simulation engine: tiny BERT, real SST-2, 2 rounds of FedProx
(its proximal term is applied in the clients' loss)."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import read_metrics


def test_two_round_simulation_writes_metrics_plot_and_a_loadable_model(run_simulation, sst2):
    folder = run_simulation({"strategy": "fedprox", "strategy-params": "proximal-mu=0.1"},
                            num_supernodes=2)
    assert json.loads((folder / "config.json").read_text())["strategy"] == "fedprox"

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["clients"] == 2
        assert record["examples"] == 160
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["macro_f1"] <= 1.0
        assert record["loss"] > 0 and record["wall_time_s"] > 0
        assert len(record["bytes_up_per_client"]) == 2
        # a dense fp32 upload of the tiny BERT is at least 4 bytes per parameter
        assert min(record["bytes_up_per_client"].values()) > 4 * 2_000_000
        assert min(record["bytes_down_per_client"].values()) > 4 * 2_000_000
    assert (folder / "plot.png").stat().st_size > 10_000
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))

    model_dir = folder / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id

    predicted = subprocess.run(
        [sys.executable, "-m", "server.predict", "--model", str(model_dir),
         "a gorgeous, witty, seductive movie.", "dull and lifeless"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    answers = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [a["text"] for a in answers] == ["a gorgeous, witty, seductive movie.",
                                            "dull and lifeless"]
    assert all(a["label"] in ("negative", "positive") and 0.5 <= a["probability"] <= 1.0
               for a in answers)
