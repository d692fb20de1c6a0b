"""End to end in deployment: a real SuperLink and two SuperNodes over gRPC on 127.0.0.1."""

from __future__ import annotations

import csv

from simulations.deployment import LocalDeployment
from tests.conftest import TINY_RUN, read_metrics


def _write_site(folder, rows):
    folder.mkdir(parents=True)
    with (folder / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    (folder / "label_names.json").write_text('["negative", "positive"]')


def test_two_institutions_with_their_own_folders_complete_two_rounds(tmp_path, sst2):
    with (sst2 / "train_sentences.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))[1:121]
    _write_site(tmp_path / "site-a", rows[:70])
    _write_site(tmp_path / "site-b", rows[70:])

    with LocalDeployment(tmp_path / "deployment") as deployment:
        deployment.start_superlink()
        deployment.start_supernode("site-a", {"data-path": str(tmp_path / "site-a")})
        deployment.start_supernode("site-b", {"data-path": str(tmp_path / "site-b")})
        folder = deployment.run({**TINY_RUN, "output-dir": str(tmp_path / "outputs"),
                                 "run-name": "deployed"})
        started = list(deployment.processes.values())
    assert all(process.poll() is not None for process in started)

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["examples"] == 120 for r in rounds[1:])
    assert (folder / "model" / "model.safetensors").exists()
