"""End to end with compression on: Flower's simulation engine, tiny BERT, real SST-2.

Uploads are top-1% + 4-bit with error feedback and zlib, downloads 8-bit deltas, and
FedAvgM (server momentum) aggregates the decoded updates; the
metrics must show the measured bytes of every client in every round, and their ratio
to dense float32.
"""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import read_metrics


def test_compressed_run_reports_measured_bytes_per_client_per_round(run_simulation, sst2):
    folder = run_simulation({"upload-codec": "topk:0.01,ef,q4,zlib", "download-codec": "q8",
                             "num-server-rounds": 3, "strategy": "fedavgm",
                             "strategy-params": "server-momentum=0.5"},
                            num_supernodes=2, name="compressed")

    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["upload_codec"] == "topk:0.01,ef,q4,zlib"
    assert recorded["download_codec"] == "q8"
    assert recorded["strategy"] == "fedavgm"  # a stateful strategy on decoded updates

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for record in rounds[1:]:
        assert record["clients"] == 2 and record["rejected"] == 0 and record["failed"] == 0
        up, down = record["bytes_up_per_client"], record["bytes_down_per_client"]
        assert len(up) == 2 and len(down) == 2
        dense_up = record["bytes_up_dense_fp32"]
        assert dense_up > 4 * 2_000_000  # the tiny BERT as float32, measured
        assert max(up.values()) < dense_up / 100
        assert record["upload_compression"] > 100
        assert record["upload_compression"] == round(dense_up / np.mean(list(up.values())), 2)
        assert np.isfinite(record["accuracy"]) and np.isfinite(record["loss"])
    # round 1 sends every client the whole model; later rounds an 8-bit delta
    assert rounds[1]["download_compression"] == 1.0
    for record in rounds[2:]:
        assert 3.5 < record["download_compression"] < 4.0
