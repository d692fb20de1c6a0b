"""Run an experiment from a TOML config on Flower's simulation engine.

    sepal-simulate [--config simulations/configs/default.toml] [--set key=value ...]

The config has a ``[federation]`` table (``num-supernodes``, ``num-cpus`` and
``num-gpus`` per virtual client), a ``[run-config]`` table (any key of the app's
``[tool.flwr.app.config]``) and an optional ``[baseline]`` table
(``centralized = true`` also trains the centralized baseline and prints both).

A private SuperLink (simulation mode, free ports, its own ``FLWR_HOME``) is started
for the run and stopped by PID afterwards; ``flwr run`` submits the app to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from sepal.config import check_declared_keys
from simulations.processes import (
    ProcessGroup,
    flower_env,
    free_port,
    wait_http_health,
    write_connection,
    write_run_config,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "simulations" / "configs" / "default.toml"
PATH_KEYS = ("dataset", "output-dir")


def load_experiment(path: Path, overrides: list[str]) -> dict[str, Any]:
    with path.open("rb") as handle:
        experiment = tomllib.load(handle)
    experiment.setdefault("federation", {})
    run_config = experiment.setdefault("run-config", {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        run_config[key.strip()] = tomllib.loads(f"v = {value}")["v"] if _is_toml(value) else value
    for key in PATH_KEYS:
        if key in run_config and _looks_like_path(str(run_config[key])):
            run_config[key] = str((path.parent / run_config[key]).resolve()
                                  if not Path(run_config[key]).is_absolute() and
                                  not (Path.cwd() / run_config[key]).exists()
                                  else Path(run_config[key]).resolve())
    return experiment


def _is_toml(value: str) -> bool:
    try:
        tomllib.loads(f"v = {value}")
        return True
    except tomllib.TOMLDecodeError:
        return False


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).exists()


def client_resources(federation: dict[str, Any]) -> dict[str, float]:
    """CPU and GPU share per virtual client; a GPU fraction only when CUDA exists."""
    import torch

    resources: dict[str, float] = {"num-cpus": int(federation.get("num-cpus", 1))}
    gpus = federation.get("num-gpus")
    if gpus is None and torch.cuda.is_available():
        per_gpu = int(federation.get("clients-per-gpu", 4))
        gpus = 1.0 / per_gpu
    resources["num-gpus"] = float(gpus or 0.0)
    return resources


def run_federated(run_config: dict[str, Any], num_supernodes: int, workdir: Path,
                  resources: dict[str, float] | None = None, app_dir: Path = PROJECT_ROOT,
                  timeout: float = 3600.0) -> Path:
    """Run the app on ``num_supernodes`` virtual clients; return the run's output folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_config = dict(run_config)
    check_declared_keys(run_config, _app_defaults(app_dir))  # Flower would not name the key
    run_config.setdefault("run-name", f"federated-{time.strftime('%Y%m%d-%H%M%S')}")
    run_config["output-dir"] = str(Path(run_config.get("output-dir", "outputs")).resolve())
    flwr_home = workdir / "flwr-home"
    port = free_port()
    federation_config = [f"num-supernodes={num_supernodes}"]
    for key, value in (resources or {}).items():
        federation_config.append(f"client-resources-{key}={value}")
    write_connection(flwr_home, "sepal-sim", f"127.0.0.1:{port}", {})
    env = flower_env(flwr_home)
    with ProcessGroup(workdir / "logs") as processes:
        superlink = processes.start("superlink", [
            "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
            "--port", str(port), "--control-api-address", f"127.0.0.1:{free_port()}",
            "--disable-runtime-dependency-installation",
        ], env=env, cwd=app_dir)
        wait_http_health(port, superlink)
        config_file = write_run_config(workdir / "run-config.toml", run_config)
        command = ["flwr", "run", str(app_dir), "sepal-sim", "--stream",
                   "--run-config", str(config_file),
                   "--federation-config", " ".join(federation_config)]
        completed = subprocess.run(command, env=env, cwd=app_dir, timeout=timeout,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
        (workdir / "logs" / "flwr-run.log").write_text(completed.stdout + completed.stderr)
        sys.stdout.write(completed.stdout)
    folder = Path(run_config["output-dir"]) / str(run_config["run-name"])
    if completed.returncode != 0 or not (folder / "model").exists():
        raise RuntimeError(
            f"federated run failed (flwr run exit {completed.returncode}); logs in "
            f"{workdir / 'logs'}:\n{completed.stderr[-3000:]}"
        )
    return folder


def last_round(folder: Path) -> dict[str, Any]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a Sepal simulation experiment.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key (repeatable)")
    parser.add_argument("--num-supernodes", type=int)
    parser.add_argument("--centralized-baseline", action="store_true")
    args = parser.parse_args(argv)

    experiment = load_experiment(args.config, args.set)
    federation = experiment["federation"]
    run_config = experiment["run-config"]
    num_supernodes = args.num_supernodes or int(federation.get("num-supernodes", 4))
    run_config.setdefault("min-available-nodes", num_supernodes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_config.setdefault("run-name", f"{args.config.stem}-{stamp}")
    workdir = Path(tempfile.mkdtemp(prefix="sepal-sim-"))
    folder = run_federated(run_config, num_supernodes, workdir, client_resources(federation))
    rows = [("federated", num_supernodes, last_round(folder), folder)]

    if args.centralized_baseline or experiment.get("baseline", {}).get("centralized", False):
        from sepal.config import RunConfig
        from simulations.centralized import run_centralized

        cfg = RunConfig.from_mapping({**_app_defaults(), **run_config})
        central = run_centralized(cfg, folder.parent / f"{folder.name}-centralized")
        rows.append(("centralized", 1, last_round(central.folder), central.folder))

    print(f"\n| mode | clients | rounds | accuracy | macro-F1 | loss | outputs |")
    print("|---|---|---|---|---|---|---|")
    for mode, clients, record, path in rows:
        print(f"| {mode} | {clients} | {record['round']} | {record['accuracy']:.4f} | "
              f"{record['macro_f1']:.4f} | {record['loss']:.4f} | {path} |")
    return 0


def _app_defaults(app_dir: Path = PROJECT_ROOT) -> dict[str, Any]:
    with (app_dir / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


if __name__ == "__main__":
    sys.exit(main())
