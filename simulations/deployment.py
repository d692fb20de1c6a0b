"""A real Flower deployment on this machine: one SuperLink and N SuperNodes over gRPC.

Used by the deployment tests and benchmarks; it is also the shortest worked example of
the commands an operator and the institutions run (see README, "Deployment").
Every process is started in its own session and stopped by PID on exit.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from simulations.processes import (
    ProcessGroup,
    flower_env,
    free_port,
    wait_http_health,
    write_connection,
    write_run_config,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class LocalDeployment(ProcessGroup):
    """``with LocalDeployment(workdir) as d: d.start_superlink(); d.start_supernode(...); d.run(cfg)``."""

    def __init__(self, workdir: Path, app_dir: Path = PROJECT_ROOT):
        super().__init__(workdir / "logs")
        self.workdir = workdir
        self.app_dir = app_dir
        self.flwr_home = workdir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.port = 0

    def superlink_command(self, database: Path) -> list[str]:
        return [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--control-api-address", f"127.0.0.1:{free_port()}",
            "--database", str(database), "--disable-runtime-dependency-installation",
        ]

    def start_superlink(self, database: Path | None = None) -> subprocess.Popen:
        self.port = self.port or free_port()
        database = database or self.workdir / "superlink-state.db"
        process = self.start("superlink", self.superlink_command(database), env=self.env,
                             cwd=self.app_dir)
        wait_http_health(self.port, process)
        write_connection(self.flwr_home, "sepal-deployment", f"127.0.0.1:{self.port}", {})
        return process

    def start_supernode(self, name: str, node_config: dict[str, Any]) -> subprocess.Popen:
        config = " ".join(f"{k}={_node_value(v)}" for k, v in node_config.items())
        return self.start(name, [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", config,
        ], env=self.env, cwd=self.app_dir)

    def run(self, run_config: dict[str, Any], timeout: float = 900.0) -> Path:
        """Submit the app with ``run_config`` and wait; returns the run's output folder."""
        run_config = dict(run_config)
        run_config.setdefault("run-name", f"deployment-{time.strftime('%Y%m%d-%H%M%S')}")
        run_config["output-dir"] = str(Path(run_config.get("output-dir", "outputs")).resolve())
        config_file = write_run_config(self.workdir / "run-config.toml", run_config)
        completed = subprocess.run(
            ["flwr", "run", str(self.app_dir), "sepal-deployment", "--stream",
             "--run-config", str(config_file)],
            env=self.env, cwd=self.app_dir, timeout=timeout, stdin=subprocess.DEVNULL,
            capture_output=True, text=True,
        )
        (self.log_dir / "flwr-run.log").write_text(completed.stdout + completed.stderr)
        folder = Path(run_config["output-dir"]) / str(run_config["run-name"])
        if completed.returncode != 0 or not (folder / "model").exists():
            raise RuntimeError(
                f"deployment run failed (flwr run exit {completed.returncode}); logs in "
                f"{self.log_dir}:\n{completed.stdout[-3000:]}\n{completed.stderr[-2000:]}"
            )
        return folder


def _node_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
