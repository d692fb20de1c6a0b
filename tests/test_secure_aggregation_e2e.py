"""Secure aggregation end to end on Flower's simulation engine, composed with compression
(8-bit codec up and down) and both kinds of DP (DP-SGD on the clients, user-level DP on
the unmasked mean): tiny BERT, real SST-2, three clients, two rounds."""

from __future__ import annotations

from sepal.model import build_model, exchanged_parameters
from tests.conftest import read_metrics


def test_secure_rounds_with_compression_and_dp_train_and_upload_b_bit_vectors(run_simulation,
                                                                              sst2):
    model = build_model("tiny-bert", ["negative", "positive"], 0)
    dim = sum(p.numel() for p in exchanged_parameters(model).values())
    folder = run_simulation({
        # a simulation has no provisioned identities: the unauthenticated mode
        "secure-aggregation": True, "secagg-authenticated": False,
        "secagg-value-bits": 16, "secagg-clip": 0.05,
        "upload-codec": "q8", "download-codec": "q8",
        "dp-sgd": True, "dp-target-epsilon": 8.0,
        "user-dp": "client-fixed", "user-dp-noise-multiplier": 0.1,
        "user-dp-clipping-norm": 0.5, "min-available-nodes": 3,
    }, num_supernodes=3, name="secagg")

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        secagg = record["secagg"]
        assert secagg["aborted"] is None and not record.get("skipped")
        assert record["clients"] == 3 and record["examples"] >= 3  # DP sites' noisy counts
        assert secagg["sum_bits"] == 18 and secagg["threshold"] == 2  # 3 clients, 16 value bits
        assert set(secagg["stage_seconds"]) == {"setup", "share-keys", "masked-input", "unmask"}
        packed = -(-dim // 8) * 18
        for up in record["bytes_up_per_client"].values():
            assert packed < up < packed * 1.01  # 2.25 bytes per parameter, not 4 (fp32) or 8
        assert len(record["epsilon_per_client"]) == 3  # DP-SGD reports pass through
        assert record["user_level_epsilon"] > 0         # noise added to the unmasked mean
        assert 0.0 <= record["accuracy"] <= 1.0
    assert rounds[2]["user_level_epsilon"] > rounds[1]["user_level_epsilon"]
    assert rounds[2]["loss"] != rounds[0]["loss"]  # the unmasked mean moved the model
