"""What survives a SuperLink restart (TLS + SuperNode auth + ``--database``), measured.

    python -m benchmarks.superlink_restart [--rounds 3] [--workdir DIR]

Provisions two institutions, starts a run of tiny BERT, and once round 1 is on disk
(metrics and checkpoint) kills the SuperLink's whole process tree with SIGKILL (as a
crash or host reboot would: its SuperExec and the run's ServerApp go with it). Then it restarts the
SuperLink on the same database and reports: whether the SuperNodes came back without
re-registration, what the database says about the interrupted run, whether that run
moves on, and what resubmitting it with ``resume=true`` gives. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import signal
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

from server.provision import FederationSpec, provision
from simulations.deployment import CONNECTION, LocalDeployment
from simulations.processes import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2"
RUN = {"model": "tiny-bert", "dataset": str(SST2.resolve()), "test-split": "dev",
       "max-test-examples": 96, "min-train-nodes": 2, "min-available-nodes": 2,
       "learning-rate": 1e-3, "batch-size": 16, "max-seq-length": 32, "round-timeout": 300.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sepal-restart-"))
    federation = _provision(workdir)
    findings: list[tuple[str, str]] = []

    with LocalDeployment(workdir / "deployment", federation=federation) as deployment:
        database = workdir / "deployment" / "superlink-state.db"
        deployment.start_superlink(database)
        deployment.register_institutions()
        for name in ("alpha", "beta"):
            deployment.start_institution(name)
        run, folder = deployment.submit({**RUN, "num-server-rounds": args.rounds,
                                         "output-dir": str(workdir / "outputs"),
                                         "run-name": "interrupted"})
        resumable = "resume" in _app_config_keys()
        # the checkpoint is written just after the round's metrics line
        _wait(lambda: (folder / "checkpoints" / "round-0001.ckpt").exists() if resumable
              else _rounds(folder) >= 2, 1800, "round 1 on disk")
        run_id = _run_id(deployment.log_text("flwr-run"))

        killed_at = time.monotonic()
        deployment.stop("superlink", signal.SIGKILL)
        findings.append(("rounds on disk when the SuperLink died", str(_rounds(folder) - 1)))
        deployment.start_superlink(database, name="superlink-restarted")
        findings.append(("SuperLink healthy again after", f"{time.monotonic() - killed_at:.1f} s"))

        online = _wait(lambda: _online_nodes(deployment) >= 2, 180, "SuperNodes back online")
        findings.append(("SuperNodes online again, no re-registration",
                         f"{online:.0f} s after the restart"))
        findings.append(("interrupted run in the database, right after the restart",
                         _run_status(deployment, run_id)))
        _wait(lambda: not _run_status(deployment, run_id).startswith("running"), 300,
              "change of the run's status")
        findings.append(("... then", f"{_run_status(deployment, run_id)}, "
                                     f"{time.monotonic() - killed_at:.0f} s after the crash"))
        findings.append(("rounds on disk by then (did the run move on?)",
                         str(_rounds(folder) - 1)))
        findings.append(("`flwr run --stream` of that run", "still waiting" if run.poll() is None
                         else f"exited with {run.returncode}"))
        deployment.stop("flwr-run")

        started = time.monotonic()
        if resumable:
            after = deployment.run({**RUN, "num-server-rounds": args.rounds, "resume": True,
                                    "output-dir": str(workdir / "outputs"),
                                    "run-name": "interrupted"})
            what = "the interrupted run resubmitted with resume=true"
        else:
            after = deployment.run({**RUN, "num-server-rounds": 1,
                                    "output-dir": str(workdir / "outputs"), "run-name": "after"})
            what = "a new 1-round run (this checkout has no `resume` setting)"
        resumed = re.search(r"resuming from \S+ \(round (\d+) complete\)",
                            deployment.log_text("flwr-run"))
        findings.append((what, f"completed in {time.monotonic() - started:.0f} s, rounds on "
                               f"disk {_rounds(after) - 1}" + (
                                   f", continued after round {resumed.group(1)}"
                                   if resumed else "")))

    print("| after a SuperLink crash + restart on the same --database | measured |")
    print("|---|---|")
    for what, value in findings:
        print(f"| {what} | {value} |")
    print(f"\nlogs: {workdir / 'deployment' / 'logs'}")


def _app_config_keys() -> set[str]:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    return set(pyproject["tool"]["flwr"]["app"]["config"])


def _provision(workdir: Path) -> Path:
    with (SST2 / "train_sentences.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))[1:81]
    institutions = {}
    for i, name in enumerate(("alpha", "beta")):
        folder = workdir / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows[i * 40:(i + 1) * 40])
        (folder / "label_names.json").write_text('["negative", "positive"]')
        institutions[name] = {"data-path": str(folder), "device": "cpu", "dp-max-epsilon": 0.0}
    spec = FederationSpec.from_mapping({"name": "restart", "superlink": f"127.0.0.1:{free_port()}",
                                        "institutions": institutions})
    provision(spec, workdir / "federation")
    return workdir / "federation"


def _wait(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no {what} after {timeout:.0f}s")
        time.sleep(1)
    return time.monotonic() - started


def _rounds(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _run_id(log: str) -> str:
    for line in log.splitlines():
        if "Successfully started run" in line:
            return line.rsplit(" ", 1)[1].strip()
    raise RuntimeError(f"no run id in the flwr run log:\n{log[-2000:]}")


def _flwr_json(deployment: LocalDeployment, *command: str) -> dict:
    stdout = subprocess.run(["flwr", *command, CONNECTION, "--format", "json"],
                            env=deployment.env, cwd=deployment.app_dir, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL).stdout
    start = stdout.find("{")
    return json.loads(stdout[start:]) if start >= 0 else {}


def _online_nodes(deployment: LocalDeployment) -> int:
    nodes = _flwr_json(deployment, "supernode", "ls").get("nodes", [])
    return sum(node.get("status") == "online" for node in nodes)


def _run_status(deployment: LocalDeployment, run_id: str) -> str:
    for run in _flwr_json(deployment, "ls").get("runs", []):
        if run.get("run-id") == run_id:
            details = run.get("status-details") or ""
            return f"{run.get('status')}" + (f" ({details})" if details else "")
    return "not listed"


if __name__ == "__main__":
    main()
