"""Shared fixtures: paths to the real datasets and a runner for real Flower simulations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT.parent / "shared" / "data").resolve()
SST2 = SHARED_DATA / "sst2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast run settings: the tiny random BERT on a few hundred SST-2 sentences.
TINY_RUN = {
    "model": "tiny-bert",
    "dataset": str(SST2),
    "test-split": "dev",
    "max-train-examples": 160,
    "max-test-examples": 96,
    "num-server-rounds": 2,
    "min-train-nodes": 2,
    "min-available-nodes": 2,
    "learning-rate": 1e-3,
    "batch-size": 16,
    "max-seq-length": 32,
}


@pytest.fixture(scope="session")
def sst2() -> Path:
    if not SST2.exists():
        pytest.fail(f"real data missing: {SST2} (expected ../shared/data beside the project)")
    return SST2


@pytest.fixture
def run_simulation(tmp_path):
    """Run the app on Flower's simulation engine; returns the run's output folder."""
    from simulations.run import run_federated

    def run(overrides: dict | None = None, num_supernodes: int = 2, name: str = "sim") -> Path:
        config = {**TINY_RUN, **(overrides or {}), "output-dir": str(tmp_path / "outputs"),
                  "run-name": name}
        return run_federated(config, num_supernodes, tmp_path / f"work-{name}",
                             {"num-cpus": 1}, timeout=600)

    return run


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
