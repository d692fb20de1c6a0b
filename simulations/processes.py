"""Start Flower's processes (SuperLink, SuperNodes, ``flwr run``) and stop them by PID.

Every process is started in its own session so that stopping it also stops what it
spawned (a simulation SuperLink starts ServerApp and Ray processes). A SuperLink starts
its SuperExec in a session of its own, so the descendants of each process are also
looked up by parent PID and stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import tomli_w

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), **(extra or {})}
    if os.environ.get("HF_HUB_OFFLINE") == "0":  # the user asked for the hub (a hub dataset)
        env["HF_HUB_OFFLINE"] = "0"
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


class ProcessGroup:
    """Processes started here; ``stop()`` ends each one's whole session, by PID."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        descendants = _descendants(process.pid)
        _signal_session(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_session(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
        # children that outlived the leader still belong to its session
        _signal_session(process.pid, signal.SIGKILL)
        for pid in descendants:
            _signal_session(pid, signal.SIGKILL)
            _signal_pid(pid, signal.SIGKILL)

    def wait_for_log(self, name: str, text: str, timeout: float = 120.0) -> str:
        """Wait until ``text`` appears in the log of process ``name``; returns the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text(name)
            if text in log:
                return log
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                log = self.log_text(name)
                if text in log:
                    return log
                raise RuntimeError(f"{name} exited ({process.returncode}) without logging "
                                   f"{text!r}:\n{log[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{name} did not log {text!r} in {timeout:.0f}s:\n"
                           f"{self.log_text(name)[-3000:]}")

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _signal_session(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[int]:
    """PIDs of every living descendant of ``pid``."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_http_health(port: int, process: subprocess.Popen, timeout: float = 300.0,
                     ca_file: Path | None = None) -> None:
    """Wait for ``/health`` on 127.0.0.1:port (HTTPS verified against ``ca_file`` if given)."""
    scheme = "https" if ca_file else "http"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before it was up")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1,
                                        context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing healthy on 127.0.0.1:{port} after {timeout:.0f}s")


def write_connection(flwr_home: Path, name: str, address: str, options: dict[str, object],
                     root_certificates: Path | None = None) -> None:
    """A SuperLink connection in ``$FLWR_HOME/config.toml`` (how flwr 1.42 finds one)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, object] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates)
    if options:
        connection["options"] = dict(options)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": name, name: connection}}))


def write_run_config(path: Path, values: dict[str, object]) -> Path:
    path.write_text(tomli_w.dumps(values))
    return path
