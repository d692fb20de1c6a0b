"""A simulation joins a Ray cluster started beforehand (docs/simulations.md, "More than
one machine"): a one-node Ray head on this machine, the simulation pointed at it through
RAY_ADDRESS, and the cluster's own GCS and raylet logs showing the simulation's job and its
ClientApp actors (a simulation that started a Ray of its own leaves no trace there)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from simulations.processes import OFFLINE_ENV, ProcessGroup, free_port
from tests.conftest import read_metrics


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head node (2 CPUs, no dashboard, small object store) on free ports; yields
    (GCS address, session folder) and stops every process of the head by PID, even when
    the test fails."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must be short
    gcs_port = free_port()
    processes = ProcessGroup(tmp_path / "ray-logs")
    try:
        processes.start("ray-head", [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
            "--disable-usage-stats", "--object-store-memory=80000000",
            f"--temp-dir={temp_dir}", "--include-dashboard=false", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ], env={**_environ(), **OFFLINE_ENV})
        processes.wait_for_log("ray-head", "Ray runtime started", timeout=60)
        yield f"127.0.0.1:{gcs_port}", Path(temp_dir) / "session_latest"
    finally:
        processes.stop_all()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def test_simulation_runs_on_a_ray_cluster_started_beforehand(ray_head, run_simulation, sst2,
                                                             monkeypatch):
    gcs_address, session = ray_head
    monkeypatch.setenv("RAY_ADDRESS", gcs_address)

    folder = run_simulation({"num-server-rounds": 1}, num_supernodes=2)

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients"] == 2 and 0.0 <= rounds[1]["accuracy"] <= 1.0
    # the cluster's GCS registered the simulation as its only job (this test never connects)
    gcs_log = (session / "logs" / "gcs_server.out").read_text()
    (job_id,) = re.findall(r"Registering job\. job_id=(\w+) driver_pid=\d+", gcs_log)
    created = set(re.findall(rf"Actor created successfully job_id={job_id} actor_id=(\w+)",
                             gcs_log))
    # ... and the cluster's raylet ran that job's ClientApp actors
    client_apps = [path for path in (session / "logs").glob(f"worker-*-{job_id}-*.out")
                   if ":actor_name:ClientAppActor" in path.read_text()]
    assert client_apps, "no ClientAppActor ran on the cluster started beforehand"
    assert len(created) == len(client_apps)
