"""The private preset (DP-SGD on every site + secure aggregation at 8 value bits + LoRA)
runs end to end on Flower's simulation engine, scaled down to tiny BERT."""

from __future__ import annotations

from simulations.run import PROJECT_ROOT, load_experiment
from tests.conftest import SST2, read_metrics

PRESET = PROJECT_ROOT / "simulations" / "configs" / "private.toml"
SITES = 3


def test_the_private_preset_runs_and_records_epsilon_secure_sum_bytes_and_classes(
        run_simulation):
    preset = load_experiment(PRESET, [])["run-config"]
    assert preset["dp-sgd"] and preset["secure-aggregation"] and preset["lora"]
    assert preset["secagg-value-bits"] == 8 and preset["dp-target-epsilon"] == 8.0
    scaled_down = {key: value for key, value in preset.items() if key != "output-dir"}
    scaled_down.update({
        "model": "tiny-bert", "dataset": str(SST2), "max-train-examples": 480,
        "max-test-examples": 96, "partitioner": "iid", "min-train-nodes": SITES,
        "min-available-nodes": SITES,
        "num-server-rounds": 2, "batch-size": 64, "physical-batch-size": 16,
        "max-seq-length": 32,
    })
    folder = run_simulation(scaled_down, num_supernodes=SITES, name="private-preset")
    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert not record.get("skipped"), record.get("secagg")
        secagg = record["secagg"]
        assert secagg["aborted"] is None
        assert secagg["sum_bits"] == 10  # 8 value bits, 3 clients: bitlength(2 * 3 * 127)
        assert len(record["epsilon_per_client"]) == SITES
        assert all(0 < eps <= 8.0 + 1e-6 for eps in record["epsilon_per_client"].values())
        assert len(record["bytes_up_per_client"]) == SITES
        assert all(size > 0 for size in record["bytes_up_per_client"].values())
    final = rounds[-1]
    assert set(final["per_class"]) == {"negative", "positive"}
    assert sum(c["support"] for c in final["per_class"].values()) == 96
    assert 0.0 <= final["worst_class_recall"] <= 1.0
