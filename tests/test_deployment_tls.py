"""A provisioned federation on 127.0.0.1: TLS, SuperNode authentication, faults, refusals.

Real ``flower-superlink`` / ``flower-supernode`` processes (through the sepal-*
entry points), started from the scripts ``sepal-provision`` wrote, stopped by PID.
"""

from __future__ import annotations

import csv
import datetime
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from server import pki
from server.provision import FederationSpec, provision
from simulations.deployment import LocalDeployment
from simulations.processes import free_port
from tests.conftest import PROJECT_ROOT, TINY_RUN, read_metrics
from tests.held_client_app import HOLD_REPLY_S, HOLD_ROUND

INSTITUTIONS = ("alpha", "beta", "gamma")
ROWS_PER_INSTITUTION = 40
# A normal round is dominated by three fresh ClientApp processes importing torch and
# transformers: ~20 s on 2 idle cores, minutes on a shared, overloaded one. The round
# timeout is therefore 8x the time one such import takes here and now, at least 90 s,
# at most 300 s (round 2 lasts that long, and the test must end within pytest's 900 s).
# Beta holds its round-2 reply until 5 s after the timeout (the server polls every 3 s):
# certainly late, and in before round 3 ends, which needs new ClientApp processes to
# start, import and train.
MIN_ROUND_TIMEOUT = 90.0
MAX_ROUND_TIMEOUT = 300.0


def _round_timeout() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import client.app"], check=True, timeout=600,
                   cwd=PROJECT_ROOT)
    return min(MAX_ROUND_TIMEOUT,
               max(MIN_ROUND_TIMEOUT, round(8 * (time.monotonic() - started))))


def _write_site(folder: Path, rows: list[list[str]]) -> None:
    folder.mkdir(parents=True)
    with (folder / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    (folder / "label_names.json").write_text('["negative", "positive"]')


def _app_with_held_replies(tmp_path: Path) -> Path:
    """This project as a Flower app whose ClientApp is ``tests.held_client_app``'s."""
    app_dir = tmp_path / "app"
    for folder in ("sepal", "client", "server", "strategies", "tests"):
        shutil.copytree(PROJECT_ROOT / folder, app_dir / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "README.md", app_dir)
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    component = 'clientapp = "client.app:app"'
    assert component in pyproject
    (app_dir / "pyproject.toml").write_text(
        pyproject.replace(component, 'clientapp = "tests.held_client_app:app"'))
    return app_dir


def _federation(tmp_path: Path, name: str, institutions: dict[str, dict]) -> Path:
    spec = FederationSpec.from_mapping({"name": name, "superlink": f"127.0.0.1:{free_port()}",
                                        "institutions": institutions})
    provision(spec, tmp_path / name)
    return tmp_path / name


def _node_ids(deployment: LocalDeployment, names) -> dict[int, str]:
    ids = {}
    for name in names:
        match = re.search(r"SuperNode ID: (\d+)", deployment.log_text(name))
        assert match, f"{name} never connected:\n{deployment.log_text(name)[-2000:]}"
        ids[int(match.group(1))] = name.split("-restart")[0]
    return ids


def _wait_for_round(folder: Path, server_round: int, run, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / "metrics.jsonl").exists():
            for record in read_metrics(folder):
                if record["round"] == server_round:
                    return record
        assert run.poll() is None, f"the run ended before round {server_round} was recorded"
        time.sleep(0.5)
    raise TimeoutError(f"round {server_round} not recorded in {timeout:.0f}s")


def _wait_for_count(deployment: LocalDeployment, name: str, text: str, count: int,
                    timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while deployment.log_text(name).count(text) < count:
        assert time.monotonic() < deadline, f"{name} logged {text!r} fewer than {count} times"
        time.sleep(0.2)


def test_three_institutions_with_tls_and_node_auth_survive_a_crash_and_a_slow_node(
        tmp_path, sst2):
    """One 3-round run: round 1 all three; round 2 gamma is killed mid-round and beta is
    too slow (its ClientApp holds the reply); round 3 gamma has rejoined and beta's late
    reply is dropped."""
    with (sst2 / "train_sentences.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    institutions = {}
    for i, name in enumerate(INSTITUTIONS):
        _write_site(tmp_path / "data" / name,
                    rows[i * ROWS_PER_INSTITUTION:(i + 1) * ROWS_PER_INSTITUTION])
        # no privacy cap: DP-SGD is not what this test is about
        institutions[name] = {"data-path": str(tmp_path / "data" / name), "device": "cpu",
                              "dp-max-epsilon": 0.0}
    timeout = _round_timeout()
    federation = _federation(tmp_path, "trio", institutions)
    held = {"beta": {HOLD_REPLY_S: str(timeout + 5), HOLD_ROUND: "2"}}

    config = {**TINY_RUN, "num-server-rounds": 3, "min-train-nodes": 1,
              "min-available-nodes": 3, "round-timeout": timeout,
              "output-dir": str(tmp_path / "outputs"), "run-name": "trio"}
    with LocalDeployment(tmp_path / "deployment", app_dir=_app_with_held_replies(tmp_path),
                         federation=federation) as deployment:
        deployment.start_superlink()
        deployment.register_institutions()
        for name in INSTITUTIONS:
            deployment.start_institution(name, extra_env=held.get(name))
        run, folder = deployment.submit(config)

        # progress is on disk while the run goes on
        first = _wait_for_round(folder, 1, run)
        assert run.poll() is None
        assert (first["clients"], first["sampled"], first["timed_out"]) == (3, 3, 0)
        assert (folder / "plot.png").stat().st_size > 10_000

        # gamma crashes right after it took its round-2 instruction
        _wait_for_count(deployment, "gamma", "Receiving: train message", 2)
        deployment.stop("gamma", signal.SIGKILL)
        deployment.rejoin_institution("gamma")

        folder = deployment.wait_run(run, folder)
        started = list(deployment.processes.values())
        names = [n for n in deployment.processes if n.split("-restart")[0] in INSTITUTIONS]
        node_ids = _node_ids(deployment, names)
        run_log = deployment.log_text("flwr-run")
    assert all(process.poll() is not None for process in started)

    by_name = {name: node for node, name in node_ids.items()}
    assert len(by_name) == 3 and len(node_ids) == 3, "gamma kept its node id across the restart"
    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    one, two, three = rounds[1:]
    assert set(map(int, one["bytes_up_per_client"])) == set(node_ids)
    # round 2: only alpha in time; beta timed out, gamma timed out or reported unavailable
    assert two["clients"] == 1 and two["examples"] == ROWS_PER_INSTITUTION
    assert set(map(int, two["bytes_up_per_client"])) == {by_name["alpha"]}
    assert two["timed_out"] + two["failed"] == 2 and two["timed_out"] >= 1
    # round 3: gamma is back and trains
    assert by_name["gamma"] in set(map(int, three["bytes_up_per_client"]))
    assert three["clients"] >= 2

    # the late reply from beta was collected, logged and not aggregated
    assert re.search(rf"late reply from node {by_name['beta']} to round 2 discarded", run_log)
    assert sum(r.get("late_discarded", 0) for r in rounds[1:]) >= 1
    assert re.search(rf"round 2: node {by_name['beta']} did not reply within round-timeout",
                     run_log)
    # one line per round with the counts, accuracy, bytes and seconds
    line = re.search(r"round 2/3 \|  1/3  answered \|  2 failed \((\d) timed out\) \|  0 refused "
                     r"\| accuracy [0-9.]+ .*\| up +[0-9.]+ MB \| down +[0-9.]+ MB \| +[0-9.]+s",
                     run_log)
    assert line, run_log[-3000:]
    assert (folder / "model" / "model.safetensors").exists()


def test_refusals_are_logged_on_both_sides(tmp_path):
    """Unregistered key, plaintext, wrong CA and an expired SuperLink certificate."""
    federation = _federation(tmp_path, "fed", {"alpha": {}, "beta": {}})
    other = _federation(tmp_path, "other", {"mallory": {}})
    mallory = other / "institutions" / "mallory"

    with LocalDeployment(tmp_path / "deployment", federation=federation) as deployment:
        deployment.start_superlink()
        deployment.register_institutions()
        deployment.start_institution("alpha")
        deployment.wait_for_log("alpha", "SuperNode ID")

        deployment.start_supernode("unregistered", extra_args=(
            "--root-certificates", str(federation / "operator" / "ca.pem"),
            "--auth-supernode-private-key", str(mallory / "supernode-auth.key")))
        deployment.start_supernode("wrong-ca", extra_args=(
            "--root-certificates", str(mallory / "ca.pem"),
            "--auth-supernode-private-key",
            str(federation / "institutions" / "beta" / "supernode-auth.key")))
        deployment.start_supernode("plaintext", extra_args=("--insecure",))

        unregistered = deployment.wait_for_log("unregistered", "Failed to activate SuperNode")
        wrong_ca = deployment.wait_for_log("wrong-ca", "CERTIFICATE_VERIFY_FAILED")
        plaintext = deployment.wait_for_log("plaintext", "this SuperLink requires TLS")
        deployment.wait_for_log("superlink", "[HTTP_REQUEST]")
        deployment.wait_for_log("superlink", "[TLSV1_ALERT_UNKNOWN_CA]")
        assert deployment.processes["unregistered"].wait(60) != 0
        assert deployment.processes["wrong-ca"].wait(60) != 0
        assert deployment.processes["plaintext"].poll() is None  # Flower retries forever
        superlink = deployment.log_text("superlink")

        # an expired SuperLink certificate (same CA and key): refused by a registered node
        deployment.stop("superlink")
        expired = tmp_path / "expired.pem"
        expired.write_bytes(pki.certificate_pem(_expired_certificate(federation)))
        deployment.start("superlink-expired", deployment.superlink_command(
            tmp_path / "deployment" / "superlink-state.db") + ["--ssl-certfile", str(expired)],
            env=deployment.env, cwd=deployment.app_dir)
        deployment.wait_for_log("superlink-expired", "Application startup complete")
        deployment.start_institution("beta")
        expired_node = deployment.wait_for_log("beta", "certificate has expired")
        expired_link = deployment.wait_for_log("superlink-expired",
                                               "[SSLV3_ALERT_CERTIFICATE_EXPIRED]")
        assert deployment.processes["beta"].wait(60) != 0

    assert "No SuperNode found with the given public key" in superlink
    assert "Failed to initialize the connection to the SuperLink" in unregistered
    assert "unable to get local issuer certificate" in wrong_ca
    assert "does not trust this SuperLink's certificate" in superlink
    assert "spoke plaintext HTTP to this TLS port" in superlink
    assert "Server disconnected without sending a response" in plaintext
    assert re.search(r"SuperLink certificate \S+expired\.pem expired on", expired_link)
    assert "rejected this SuperLink's certificate as expired" in expired_link
    assert "Failed to initialize the connection to the SuperLink" in expired_node


def _expired_certificate(federation: Path):
    now = datetime.datetime.now(datetime.timezone.utc)
    return pki.issue_server_certificate(
        pki.load_private_key(federation / "ca" / "ca.key"),
        pki.load_certificate(federation / "ca" / "ca.pem"),
        pki.load_private_key(federation / "operator" / "superlink.key"),
        ["127.0.0.1"], now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
