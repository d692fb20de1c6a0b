"""Run an experiment from a TOML file on Flower's simulation engine.

    sepal-simulate [--config simulations/configs/default.toml] [--set key=value ...]

The experiment file has a [federation] table (num-supernodes; num-cpus and num-gpus
per simulated site), a [run-config] table (any run-config key, see
docs/configuration.md) and an optional [baseline] table (centralized = true also
trains the centralized baseline and prints both). Relative paths in dataset and
output-dir are resolved against the experiment file when they do not exist in the
working directory.

The settings and the dataset are checked before anything starts. A private SuperLink
(simulation mode, free ports, its own FLWR_HOME) is then started for the run and
stopped afterwards; `flwr run` submits the app to it and its output is shown as the
run goes (and kept in the work folder's logs/flwr-run.log).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, TextIO

from sepal.cli import version_text
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


def check_experiment(run_config: dict[str, Any]) -> None:
    """Stop with a clear error before any process starts: unknown keys, bad values, a
    dataset that cannot be read (a bare name that is not a folder, offline)."""
    from sepal.data import DataError, is_local, load_split
    from sepal.settings import Settings

    cfg = Settings.from_mapping({**app_defaults(), **run_config}).run
    if not is_local(cfg.dataset) and os.environ.get("HF_HUB_OFFLINE", "1") != "0":
        raise DataError(
            f"run config 'dataset' {cfg.dataset!r} is not a folder (looked in {Path.cwd()} and "
            "beside the experiment file) and the Hugging Face hub is off "
            "(HF_HUB_OFFLINE). Point 'dataset' at a folder of <split>.csv files, e.g. "
            "../shared/data/sst2, or set HF_HUB_OFFLINE=0 to fetch a hub dataset")
    for split in (cfg.test_split, cfg.train_split):
        load_split(cfg.dataset, split, cfg.text_column, cfg.label_column)


def run_federated(run_config: dict[str, Any], num_supernodes: int, workdir: Path,
                  resources: dict[str, float] | None = None,
                  timeout: float | None = None, echo: TextIO | None = None) -> Path:
    """Run the app on ``num_supernodes`` simulated sites; return the run's output folder.

    The run's output goes to ``workdir/logs/flwr-run.log`` line by line and, when
    ``echo`` is given, to it as well (without ANSI colours unless it is a terminal).
    ``timeout``: seconds before the run is stopped (None = no limit).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    from sepal.settings import check_known_keys

    run_config = dict(run_config)
    check_known_keys(run_config)  # Flower would not name the key
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
        ], env=env, cwd=PROJECT_ROOT)
        wait_http_health(port, superlink, timeout=180.0)
        config_file = write_run_config(workdir / "run-config.toml", run_config)
        command = ["flwr", "run", str(PROJECT_ROOT), "sepal-sim", "--stream",
                   "--run-config", str(config_file),
                   "--federation-config", " ".join(federation_config)]
        returncode, tail = _stream(command, env, PROJECT_ROOT, workdir / "logs" / "flwr-run.log",
                                   echo, timeout)
    folder = Path(run_config["output-dir"]) / str(run_config["run-name"])
    if returncode != 0 or not (folder / "model").exists():
        reason = (f"stopped after --timeout {timeout:g}s" if returncode is None
                  else f"flwr run exit {returncode}")
        raise RuntimeError(f"federated run failed ({reason}); logs in {workdir / 'logs'}:\n"
                           f"{tail[-3000:]}")
    return folder


def _stream(command: list[str], env: dict[str, str], cwd: Path, log_path: Path,
            echo: TextIO | None, timeout: float | None) -> tuple[int | None, str]:
    """Run ``command``, copying its output line by line to ``log_path`` and ``echo``.

    Returns the exit code (None when ``timeout`` ran out) and the output's last lines.
    """
    from sepal.logs import strip_ansi

    colour = echo is not None and echo.isatty()
    tail: list[str] = []
    process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", bufsize=1, start_new_session=True)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        process.kill()

    timer = threading.Timer(timeout, stop) if timeout else None
    if timer is not None:
        timer.start()
    try:
        with log_path.open("w", encoding="utf-8") as log:
            for line in process.stdout:
                plain = strip_ansi(line)
                log.write(plain)
                log.flush()
                tail = (tail + [plain])[-60:]
                if echo is not None:
                    echo.write(line if colour else plain)
                    echo.flush()
        process.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    return (None if expired.is_set() else process.returncode), "".join(tail)


def last_round(folder: Path) -> dict[str, Any]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sepal-simulate", description=_description(),
        formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="experiment file ([federation], [run-config], [baseline] tables)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key; repeatable; the value is read as "
                             "TOML when it parses, else as a string (--set model=tiny-bert)")
    parser.add_argument("--num-supernodes", type=int,
                        help="simulated sites (default: the experiment's num-supernodes, else 4)")
    parser.add_argument("--centralized-baseline", action="store_true",
                        help="also train the centralized baseline on the same examples")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop the run after this many seconds (default: no limit)")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the SuperLink started here is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from sepal.config import ConfigError
    from sepal.data import DataError

    experiment = load_experiment(args.config, args.set)
    federation = experiment["federation"]
    run_config = experiment["run-config"]
    num_supernodes = args.num_supernodes or int(federation.get("num-supernodes", 4))
    run_config.setdefault("min-available-nodes", num_supernodes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_config.setdefault("run-name", f"{args.config.stem}-{stamp}")
    try:
        check_experiment(run_config)
    except (ConfigError, DataError) as err:
        parser.exit(2, f"sepal-simulate: {args.config}: {err}\n")
    workdir = Path(tempfile.mkdtemp(prefix="sepal-sim-"))
    try:
        folder = run_federated(run_config, num_supernodes, workdir, client_resources(federation),
                               timeout=args.timeout, echo=sys.stdout)
    except (RuntimeError, TimeoutError) as err:
        parser.exit(1, f"sepal-simulate: {str(err).splitlines()[0]}\n")
    rows = [("federated", num_supernodes, last_round(folder), folder)]

    if args.centralized_baseline or experiment.get("baseline", {}).get("centralized", False):
        central = centralized_baseline(run_config, folder.parent / f"{folder.name}-centralized")
        rows.append(("centralized", 1, last_round(central), central))

    print("\n| mode | clients | rounds | accuracy | macro-F1 | loss | outputs |")
    print("|---|---|---|---|---|---|---|")
    for mode, clients, record, path in rows:
        print(f"| {mode} | {clients} | {record['round']} | {record['accuracy']:.4f} | "
              f"{record['macro_f1']:.4f} | {record['loss']:.4f} | {path} |")
    return 0


def _description() -> str:
    title, _usage, rest = __doc__.split("\n\n", 2)
    return f"{title}\n\n{rest}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults in the option list (where there is one to show), the description as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def centralized_baseline(run_config: dict[str, Any], folder: Path) -> Path:
    """Train the centralized baseline of ``run_config`` (LoRA when the run uses it) into
    ``folder``; returns that folder."""
    from sepal.settings import Settings
    from simulations.centralized import run_centralized

    settings = Settings.from_mapping({**app_defaults(), **run_config})
    return run_centralized(settings.run, folder,
                           settings.lora if settings.lora.lora else None).folder


def app_defaults() -> dict[str, Any]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


if __name__ == "__main__":
    sys.exit(main())
