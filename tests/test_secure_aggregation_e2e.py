"""Secure aggregation end to end on Flower's simulation engine: tiny BERT, real SST-2."""

from __future__ import annotations

from tests.conftest import read_metrics


def test_secure_aggregation_rounds_train_the_model_and_upload_b_bit_vectors(run_simulation, sst2):
    from sepal.model import build_model, exchanged_parameters

    model = build_model("tiny-bert", ["negative", "positive"], 0)
    dim = sum(p.numel() for p in exchanged_parameters(model).values())
    folder = run_simulation({"secure-aggregation": True, "secagg-clip": 0.05}, num_supernodes=3,
                            name="secagg")

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        secagg = record["secagg"]
        assert secagg["aborted"] is None and not record.get("skipped")
        assert record["clients"] == 3 and record["examples"] == 160
        assert secagg["sum_bits"] == 18 and secagg["threshold"] == 2  # n = 3, q = 16
        assert set(secagg["stage_seconds"]) == {"setup", "share-keys", "masked-input", "unmask"}
        packed = -(-dim // 8) * 18
        for up in record["bytes_up_per_client"].values():
            assert packed < up < packed * 1.01  # 2.25 bytes per parameter, not 4 (fp32) or 8
        assert record["train_loss"] > 0 and 0.0 <= record["accuracy"] <= 1.0
    assert rounds[2]["loss"] != rounds[0]["loss"]  # the unmasked mean moved the model
