"""Kill the ServerApp with SIGKILL mid-run in a real deployment, resume, get the same model.

One SuperLink and two SuperNodes on 127.0.0.1 serve three submissions of the same
FedAdam run (FedAdam carries moments from round to round, which the checkpoint must
restore): an uninterrupted one, one whose ServerApp process is killed during round 2,
and its resumption.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
from safetensors.numpy import load_file

from simulations.deployment import LocalDeployment
from simulations.processes import write_run_config
from tests.conftest import TINY_RUN, read_metrics


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running_serverapps(superlink: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for process in _descendants(superlink):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and any(
                    "flwr-serverapp" in part for part in process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def _submit(deployment: LocalDeployment, run_config: dict) -> None:
    """``flwr run`` without --stream: returns once the SuperLink has accepted the run."""
    config_file = write_run_config(deployment.workdir / "submitted.toml", run_config)
    subprocess.run(["flwr", "run", str(deployment.app_dir), "sepal-deployment",
                    "--run-config", str(config_file)],
                   env=deployment.env, cwd=deployment.app_dir, check=True, timeout=120,
                   stdin=subprocess.DEVNULL, capture_output=True)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


def test_serverapp_killed_mid_round_resumes_to_the_same_model(tmp_path, sst2):
    run = {**TINY_RUN, "max-train-examples": 64, "max-test-examples": 64, "max-seq-length": 16,
           "strategy": "fedadam", "strategy-params": "eta=0.01",
           "output-dir": str(tmp_path / "outputs")}
    killed_folder = tmp_path / "outputs" / "killed"
    spawned: set[psutil.Process] = set()  # Flower starts app processes outside our sessions
    try:
        with LocalDeployment(tmp_path / "deployment") as deployment:
            # in-memory SuperLink state: a SQLite file can hit "database is locked" on a busy host
            superlink = deployment.start_superlink(database=Path(":flwr-in-memory:"))
            nodes = [deployment.start_supernode(f"node-{p}", {"partition-id": p,
                                                               "num-partitions": 2})
                     for p in (0, 1)]
            try:
                straight = deployment.run({**run, "run-name": "straight"})

                _submit(deployment, {**run, "run-name": "killed"})
                _wait_for(lambda: (killed_folder / "checkpoints" / "round-0001.ckpt").exists(),
                          600, "checkpoint of round 1")
                (serverapp,) = _wait_for(lambda: _running_serverapps(superlink), 30, "ServerApp")
                serverapp.send_signal(signal.SIGKILL)
                _wait_for(lambda: serverapp not in _running_serverapps(superlink), 30,
                          "end of the killed ServerApp")
                checkpoints = sorted(p.name for p in (killed_folder / "checkpoints").iterdir())
                assert checkpoints == ["round-0001.ckpt"]  # killed before round 2 completed
                assert not (killed_folder / "model").exists()

                resumed = deployment.run({**run, "run-name": "killed", "resume": True})
            finally:
                for process in [superlink, *nodes]:
                    spawned.update(_descendants(process))
    finally:
        for process in spawned:
            if process.is_running():
                process.kill()

    assert resumed == killed_folder
    final, reference = (load_file(str(folder / "model" / "model.safetensors"))
                        for folder in (resumed, straight))
    assert final.keys() == reference.keys()
    assert all(np.array_equal(final[k], reference[k]) for k in reference)  # bit-identical
    metrics, expected = read_metrics(resumed), read_metrics(straight)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    assert [r["clients"] for r in metrics[1:]] == [2, 2]
    assert [(r["accuracy"], r["loss"]) for r in metrics] == [(r["accuracy"], r["loss"])
                                                             for r in expected]
