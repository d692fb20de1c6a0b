"""End to end on Flower's simulation engine through ``sepal-simulate``: tiny BERT, real
SST-2, 2 rounds of FedProx (its proximal term is applied in the clients' loss)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import PROJECT_ROOT, TINY_RUN, read_metrics

ANSI = re.compile(r"\x1b\[")


def _experiment(tmp_path, run_config: dict) -> str:
    lines = ["[federation]", "num-supernodes = 2", "num-cpus = 1", "", "[run-config]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in run_config.items()]
    path = tmp_path / "experiment.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _simulate(*args: str, timeout: float = 850) -> subprocess.CompletedProcess:
    """Run sepal-simulate; past ``timeout`` it gets SIGTERM, which stops its SuperLink too."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    command = [sys.executable, "-m", "simulations.run", *args]
    with subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_round_simulation_prints_a_readable_log_and_writes_its_outputs(tmp_path, sst2):
    run_config = {**TINY_RUN, "strategy": "fedprox", "strategy-params": "proximal-mu=0.1",
                  "output-dir": str(tmp_path / "outputs"), "run-name": "sim"}
    done = _simulate("--config", _experiment(tmp_path, run_config), "--timeout", "800")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "outputs" / "sim"

    # the log: header, one line per round, the summary; no library noise
    out = done.stdout
    assert "LOAD REPORT" not in out and "Writing model shards" not in out
    assert not ANSI.search(out), "ANSI escapes in output that is not a terminal"
    assert "DEBUG" not in out
    assert "aggregate_train: Received" not in out  # the strategy sees one summed reply
    lines = [line for line in out.splitlines() if line.strip()]
    repeated = [line for line in set(lines) if lines.count(line) > 1 and "Sampled" not in line
                and "Received" not in line]
    assert not repeated, f"lines printed twice: {repeated}"
    for field in ("model ", "sites ", "strategy ", "codec ", "privacy ", "secure aggregation ",
                  "output folder "):
        assert re.search(rf"INFO :\s+ {field}\s*\S", out), f"header lacks '{field}'"
    assert "fedprox (proximal-mu=0.1), uploads summed as they arrive" in out
    assert str(folder.resolve()) in out
    round_lines = [line for line in lines if re.search(r"round \d/2 \|", line)]
    assert [re.search(r"round (\d)/2", line).group(1) for line in round_lines] == ["1", "2"]
    assert len({line.index("accuracy") for line in round_lines}) == 1, "columns not aligned"
    assert "Run finished: 2 round(s)" in out and "checkpoints" in out

    # config.json: every section of the run's settings
    config = json.loads((folder / "config.json").read_text())
    assert config["strategy"] == "fedprox" and config["dp_sgd"] is False
    for name in ("lora_r", "secure_aggregation", "user_dp", "upload_codec",
                 "checkpoint_keep", "validation_norm_multiple"):
        assert name in config

    rounds = read_metrics(folder)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["clients"] == 2
        assert record["examples"] == 160
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["macro_f1"] <= 1.0
        assert record["loss"] > 0 and record["wall_time_s"] > 0
        assert len(record["bytes_up_per_client"]) == 2
        # a dense fp32 upload of the tiny BERT is at least 4 bytes per parameter
        assert min(record["bytes_up_per_client"].values()) > 4 * 2_000_000
        assert min(record["bytes_down_per_client"].values()) > 4 * 2_000_000

    # summary.json
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["final"] == {key: rounds[-1][key]
                                for key in ("round", "accuracy", "macro_f1", "loss")}
    best = max(rounds, key=lambda r: r["accuracy"])
    assert summary["best_accuracy"] == {"round": best["round"], "value": best["accuracy"]}
    assert summary["best_macro_f1"]["value"] == max(r["macro_f1"] for r in rounds)
    assert summary["bytes_up_total"] == sum(sum(r.get("bytes_up_per_client", {}).values())
                                            for r in rounds)
    assert summary["bytes_down_total"] > 4 * 2_000_000 * 4
    assert sorted(summary["sites"]) == ["site-1", "site-2"]
    assert sorted(map(str, summary["sites"].values())) == sorted(
        rounds[1]["bytes_up_per_client"])
    assert "privacy" not in summary  # no DP in this run
    assert summary["wall_time_s"] > 0
    for name in ("folder", "config", "metrics", "summary", "plot", "model", "checkpoints"):
        assert os.path.exists(summary["paths"][name]), name

    # by default only the checkpoint a resume needs is kept, and its size is reported
    checkpoints = list((folder / "checkpoints").glob("round-*.ckpt"))
    assert [c.name for c in checkpoints] == ["round-0002.ckpt"]
    assert summary["checkpoint_bytes"] == checkpoints[0].stat().st_size

    # TensorBoard names sites, not Flower's random node ids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "bytes_up_per_client/site-1" in tags and "bytes_up_per_client/site-2" in tags
    assert not [tag for tag in tags if re.search(r"/\d+$", tag)], tags

    assert (folder / "plot.png").stat().st_size > 10_000
    model_dir = folder / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id

    predicted = subprocess.run(
        [sys.executable, "-m", "server.predict", "--model", str(model_dir),
         "a gorgeous, witty, seductive movie.", "dull and lifeless"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    answers = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [a["text"] for a in answers] == ["a gorgeous, witty, seductive movie.",
                                            "dull and lifeless"]
    assert all(a["label"] in ("negative", "positive") and 0.5 <= a["probability"] <= 1.0
               for a in answers)


@pytest.mark.parametrize("setting, expected", [
    ("dataset=trec", "run config 'dataset' 'trec' is not a folder"),
    ("no-such-key=1", "unknown key"),
    ("num-server-rounds=0", "'num-server-rounds' must be >= 1"),
])
def test_simulate_refuses_bad_settings_before_starting_the_federation(setting, expected, tmp_path):
    env_offline = os.environ.get("HF_HUB_OFFLINE", "1")
    assert env_offline != "0"
    done = _simulate("--config", str(PROJECT_ROOT / "simulations/configs/tiny.toml"),
                     "--set", setting, "--set", f"output-dir='{tmp_path}'", timeout=300)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Starting Flower" not in done.stdout and not list(tmp_path.iterdir())


def test_simulate_has_a_version_and_help_with_defaults():
    version = _simulate("--version", timeout=120)
    assert version.returncode == 0 and re.match(r"sepal \S+ \(flwr 1\.42", version.stdout)
    usage = " ".join(_simulate("--help", timeout=120).stdout.split())  # unwrap argparse lines
    # argparse may wrap a long path at a hyphen: compare with all whitespace removed
    assert re.search(r"\(default:\S*default\.toml\)", "".join(usage.split()))
    assert "no limit" in usage
    assert "(default: None)" not in usage and "``" not in usage
    for option in ("--config", "--set", "--num-supernodes", "--timeout", "--version"):
        assert option in usage
