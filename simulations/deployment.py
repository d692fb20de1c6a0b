"""A real Flower deployment on this machine: one SuperLink and N SuperNodes over gRPC/HTTPS.

Used by the deployment tests and benchmarks; it is also the shortest worked example of
the commands an operator and the institutions run (see docs/deployment.md). Two modes:

- ``LocalDeployment(workdir)``: insecure SuperLink, SuperNodes given a node config;
- ``LocalDeployment(workdir, federation=DIR)`` with DIR made by ``sepal-provision``:
  the SuperLink and every institution start from the scripts provisioning wrote (TLS,
  SuperNode authentication, ``--database``), only ``--host``/``--port`` added so that
  everything fits on 127.0.0.1.

Every process is started in its own session and stopped by PID on exit.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import tomllib
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
CONNECTION = "sepal-deployment"
ENTRY_POINTS = {"sepal-superlink": "server.superlink", "sepal-supernode": "client.supernode"}


class LocalDeployment(ProcessGroup):
    """``with LocalDeployment(workdir) as d:``  ``d.start_superlink()``,
    ``d.start_supernode(name, node_config)`` for each node, ``d.run(run_config)``.

    With ``federation=`` (a ``sepal-provision`` folder): ``start_superlink()``,
    ``register_institutions()``, ``start_institution(name)`` for each, ``run(cfg)``.
    """

    def __init__(self, workdir: Path, app_dir: Path = PROJECT_ROOT,
                 federation: Path | None = None):
        super().__init__(workdir / "logs")
        self.workdir = workdir
        self.app_dir = app_dir  # the Flower app `flwr run` submits
        self.federation = federation
        self.flwr_home = workdir / "flwr-home"
        self.env = flower_env(self.flwr_home, {
            "PATH": str(self._entry_point_shims()) + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(self.app_dir), os.environ.get("PYTHONPATH", "")) if p),
        })
        self.port = self._provisioned_port() if federation else 0

    def _entry_point_shims(self) -> Path:
        """``sepal-superlink`` / ``sepal-supernode`` running this checkout's code.

        The scripts provisioning writes call these entry points; an installed copy of the
        package may be older than this checkout (or absent), so tests run the checkout's.
        """
        bin_dir = self.workdir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, module in ENTRY_POINTS.items():
            shim = bin_dir / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
            shim.chmod(0o755)
        return bin_dir

    def _provisioned_port(self) -> int:
        spec = tomllib.loads((self.federation / "federation.toml").read_text())
        return int(spec["superlink"].rsplit(":", 1)[1])

    @property
    def ca_file(self) -> Path | None:
        return self.federation / "operator" / "ca.pem" if self.federation else None

    def superlink_command(self, database: Path) -> list[str]:
        if self.federation:
            return ["bash", str(self.federation / "operator" / "start-superlink.sh"),
                    "--host", "127.0.0.1", "--database", str(database)]
        return [
            "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--control-api-address", f"127.0.0.1:{free_port()}",
            "--database", str(database), "--disable-runtime-dependency-installation",
        ]

    def start_superlink(self, database: Path | None = None,
                        name: str = "superlink") -> subprocess.Popen:
        self.port = self.port or free_port()
        database = database or self.workdir / "superlink-state.db"
        process = self.start(name, self.superlink_command(database), env=self.env,
                             cwd=self.app_dir)
        wait_http_health(self.port, process, ca_file=self.ca_file)
        write_connection(self.flwr_home, CONNECTION, f"127.0.0.1:{self.port}", {},
                         root_certificates=self.ca_file)
        return process

    def register_institutions(self) -> str:
        """Run the operator's ``register-institutions.sh`` (``flwr supernode register``)."""
        completed = subprocess.run(
            ["bash", str(self.federation / "operator" / "register-institutions.sh")],
            env={**self.env, "FLWR_HOME": str(self.federation / "operator" / "flwr-home")},
            cwd=self.app_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120)
        output = completed.stdout + completed.stderr
        (self.log_dir / "register-institutions.log").write_text(output)
        if completed.returncode != 0:
            raise RuntimeError(f"registering the institutions failed:\n{output[-3000:]}")
        return output

    def start_institution(self, name: str, *extra_args: str, process_name: str | None = None,
                          extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start institution ``name``'s SuperNode with its own ``start-supernode.sh``;
        ``extra_env`` adds to the environment of that SuperNode and its ClientApps."""
        script = self.federation / "institutions" / name / "start-supernode.sh"
        return self.start(process_name or name,
                          ["bash", str(script), "--port", str(free_port()), *extra_args],
                          env={**self.env, **(extra_env or {})}, cwd=self.app_dir)

    def start_supernode(self, name: str, node_config: dict[str, Any] | None = None,
                        extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
        """A SuperNode with explicit options (plaintext unless ``extra_args`` set TLS options)."""
        command = ["sepal-supernode", "--superlink", f"127.0.0.1:{self.port}",
                   "--host", "127.0.0.1", "--port", str(free_port()), *extra_args]
        if not self.federation and "--root-certificates" not in extra_args:
            command.append("--insecure")
        if node_config:
            command += ["--node-config",
                        " ".join(f"{k}={_node_value(v)}" for k, v in node_config.items())]
        return self.start(name, command, env=self.env, cwd=self.app_dir)

    def rejoin_institution(self, name: str, timeout: float = 180.0) -> subprocess.Popen:
        """Restart a crashed institution's SuperNode until the SuperLink takes it back.

        After a crash the SuperLink counts the node online until its heartbeats lapse
        (Flower: 2 x 30 s) and until then refuses to activate the same key again, so the
        new SuperNode exits; a service manager with restart-on-failure does what this
        loop does.
        """
        deadline = time.monotonic() + timeout
        for attempt in itertools.count(1):
            process_name = f"{name}-restart{attempt}"
            process = self.start_institution(name, process_name=process_name)
            try:
                self.wait_for_log(process_name, "SuperNode ID", timeout=90)
                return process
            except RuntimeError:
                self.stop(process_name)
                if time.monotonic() > deadline:
                    raise
                time.sleep(10)

    def submit(self, run_config: dict[str, Any]) -> tuple[subprocess.Popen, Path]:
        """Start ``flwr run`` for ``run_config``; returns the process and the run's folder."""
        run_config = dict(run_config)
        run_config.setdefault("run-name", f"deployment-{time.strftime('%Y%m%d-%H%M%S')}")
        run_config["output-dir"] = str(Path(run_config.get("output-dir", "outputs")).resolve())
        config_file = write_run_config(self.workdir / "run-config.toml", run_config)
        process = self.start("flwr-run", [
            "flwr", "run", str(self.app_dir), CONNECTION, "--stream",
            "--run-config", str(config_file)], env=self.env, cwd=self.app_dir)
        return process, Path(run_config["output-dir"]) / str(run_config["run-name"])

    def wait_run(self, process: subprocess.Popen, folder: Path, timeout: float = 900.0) -> Path:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0 or not (folder / "model").exists():
            raise RuntimeError(
                f"deployment run failed (flwr run exit {code}); logs in {self.log_dir}:\n"
                f"{self.log_text('flwr-run')[-4000:]}")
        return folder

    def run(self, run_config: dict[str, Any], timeout: float = 900.0) -> Path:
        """Submit the app with ``run_config`` and wait; returns the run's output folder."""
        return self.wait_run(*self.submit(run_config), timeout=timeout)


def _node_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
