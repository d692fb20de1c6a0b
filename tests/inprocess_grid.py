"""The in-process runner (testing/grid.py) with the smallest run that trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from testing.grid import Hook, InProcessGrid, app_run_config, run_in_process
from tests.conftest import SST2

# tiny BERT, 16 SST-2 sentences per node (one batch)
TINY_INPROCESS = {
    "model": "tiny-bert",
    "test-split": "dev",
    "max-test-examples": 32,
    "num-server-rounds": 2,
    "max-seq-length": 16,
    "batch-size": 16,
    "learning-rate": 1e-3,
}


def run_inprocess(tmp_path: Path, overrides: dict[str, Any], num_nodes: int = 3,
                  tamper: dict[int, Hook] | None = None,
                  name: str = "run") -> tuple[Path, InProcessGrid]:
    """Run ``server.app.serve`` against ``num_nodes`` in-process ClientApps."""
    run_config = app_run_config({
        **TINY_INPROCESS, "dataset": str(SST2), "max-train-examples": 16 * num_nodes,
        "min-train-nodes": min(2, num_nodes), "min-available-nodes": num_nodes,
        "output-dir": str(tmp_path / "outputs"), "run-name": name, **overrides})
    return run_in_process(run_config, num_nodes, tamper, keep_messages=True)
