"""Serving: the int8 export against the fp32 model, ``sepal-predict`` and ``sepal-serve`` as
real processes answering a real HTTP client."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from sepal.data import TokenizedDataset, load_split, make_loader
from sepal.inference import Classifier, InferenceError, latest_run, model_folder
from sepal.model import build_model, load_tokenizer
from sepal.training import train_epochs
from server.export import export_run, weights_size
from server.export import main as export_main
from server.predict import main as predict_main
from server.serve import main as serve_main
from tests.conftest import PROJECT_ROOT
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse fixture)

MAX_LENGTH = 32
ENV = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sst2) -> Path:
    """A run folder as a run leaves it: the tiny BERT trained for one epoch on 1,600 SST-2
    sentences (so that its predictions are not all one label), exported to model/."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train = load_split(str(sst2), "train_sentences").head(1600, seed=0)
    tokenizer = load_tokenizer("tiny-bert")
    model = build_model("tiny-bert", train.label_names, seed=0, pooling="mean")
    loader = make_loader(TokenizedDataset(train, tokenizer, MAX_LENGTH), 32, shuffle=True, seed=0)
    train_epochs(model, loader, torch.optim.AdamW(model.parameters(), lr=2e-3), 1,
                 torch.device("cpu"))
    torch.set_num_threads(threads)
    run = tmp_path_factory.mktemp("outputs") / "tiny-run"
    model.save_pretrained(str(run / "model"))
    exported = copy.copy(tokenizer)
    exported.model_max_length = MAX_LENGTH
    exported.save_pretrained(str(run / "model"))
    (run / "config.json").write_text(json.dumps({"max_seq_length": MAX_LENGTH}))
    export_run(run)
    return run


@pytest.fixture(scope="module")
def clear_cases(run_dir, sst2) -> list[tuple[str, str]]:
    """The two dev sentences the int8 model finds most positive and the two most negative,
    with its labels: far enough from the boundary that the batch they share (int8
    activations are quantized per batch) cannot change their labels."""
    dev = load_split(str(sst2), "dev")
    predictions = Classifier.load(run_dir / "model-int8").predict(dev.texts)
    ranked = sorted(zip(dev.texts, predictions), key=lambda pair: pair[1].probabilities["positive"])
    return [(text, p.label) for text, p in ranked[:2] + ranked[-2:]]


def test_int8_model_agrees_with_fp32_on_the_dev_set(run_dir, sst2):
    dev = load_split(str(sst2), "dev")
    fp32 = Classifier.load(run_dir / "model")
    int8 = Classifier.load(model_folder(run_dir))
    assert int8.format == "onnx-int8" and fp32.format == "pytorch-fp32"
    assert int8.max_length == fp32.max_length == MAX_LENGTH
    assert int8.label_names == fp32.label_names == ["negative", "positive"]

    reference = np.array([p.label_id for p in fp32.predict(dev.texts)])
    quantized = np.array([p.label_id for p in int8.predict(dev.texts)])
    assert 0.1 < reference.mean() < 0.9  # both labels predicted: agreement is not trivial
    assert (reference == dev.labels).mean() > 0.6  # the model learned something
    assert (quantized == reference).mean() >= 0.98
    assert weights_size(run_dir / "model-int8") <= 0.3 * weights_size(run_dir / "model")


def test_predictions_keep_the_order_of_the_texts_across_micro_batches(run_dir):
    classifier = Classifier.load(run_dir / "model", batch_size=3)
    texts = ["a gorgeous, witty, seductive movie.", "dull", "x " * 500, "fine", "",
             "a long and tedious film with nothing to say about anything at all"]
    batched = classifier.predict(texts)
    one_by_one = [classifier.predict([text])[0] for text in texts]
    assert [p.label_id for p in batched] == [p.label_id for p in one_by_one]
    for mixed, alone in zip(batched, one_by_one):
        assert mixed.probability == pytest.approx(alone.probability, abs=1e-4)
        assert sum(mixed.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_run_and_model_folders_resolve_and_bad_ones_are_named(run_dir, tmp_path):
    assert model_folder(run_dir) == run_dir / "model-int8"
    assert model_folder(run_dir, "fp32") == run_dir / "model"
    assert latest_run(run_dir.parent) == run_dir
    with pytest.raises(InferenceError, match="does not exist"):
        model_folder(tmp_path / "missing")
    with pytest.raises(InferenceError, match="no config.json"):
        Classifier.load(model_folder(tmp_path))
    with pytest.raises(InferenceError, match="no run under"):
        latest_run(tmp_path)
    (tmp_path / "config.json").write_text('{"id2label": {"0": "only"}}')
    with pytest.raises(InferenceError, match="id2label"):
        Classifier.load(tmp_path)


def test_export_of_a_folder_without_a_model_fails_naming_it(tmp_path, capsys):
    assert export_main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "model/config.json" in error


def test_predict_cli_reads_stdin_in_batches_and_names_a_missing_folder(run_dir, clear_cases,
                                                                       tmp_path, capsys,
                                                                       monkeypatch):
    lines = [clear_cases[0][0], "", *[text for text, _ in clear_cases[1:]]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert predict_main(["--model", str(run_dir), "--batch-size", "3"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["text"], a["label"]) for a in answers] == clear_cases
    assert {label for _, label in clear_cases} == {"negative", "positive"}

    assert predict_main(["--model", str(tmp_path / "nowhere"), "x"]) == 2
    assert f"model folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(client: httpx.Client, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"sepal-serve exited with {process.returncode}: "
                        f"{process.stderr.read().decode()}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"sepal-serve not healthy after {timeout} s")


@pytest.fixture
def service(run_dir):
    """``sepal-serve`` on the run's folder, in its own process group, on a free port."""
    (run_dir / "privacy.json").write_text(json.dumps({"statement": "(8.0, 1e-05)-DP per client"}))
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.serve", "--outputs", str(run_dir.parent),
         "--port", str(port), "--max-texts", "8", "--max-text-chars", "1000",
         "--max-body-bytes", "4000", "--threads", "1"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        _wait_healthy(client, process, timeout=900)
        yield client, process
    finally:
        client.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        (run_dir / "privacy.json").unlink()


def test_service_answers_rejects_bad_requests_stays_up_and_stops(service, run_dir,
                                                                  clear_cases):
    client, process = service
    metadata = client.get("/metadata").json()
    assert metadata["label_names"] == ["negative", "positive"]
    assert metadata["max_length"] == MAX_LENGTH
    assert metadata["format"] == "onnx-int8"
    assert metadata["run"] == run_dir.name
    assert metadata["privacy"] == {"statement": "(8.0, 1e-05)-DP per client"}

    texts = [text for text, _ in clear_cases]
    answer = client.post("/predict", json={"texts": texts})
    assert answer.status_code == 200
    predictions = answer.json()["predictions"]
    assert [p["label"] for p in predictions] == [label for _, label in clear_cases]
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
               for p in predictions)

    # concurrent requests share micro-batches; each gets its own answers back
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda text: client.post("/predict", json={"texts": [text]}),
                                texts * 4))
    assert [r.json()["predictions"][0]["label"] for r in replies] == \
        [label for _, label in clear_cases] * 4

    def chunked(payload: bytes):
        for start in range(0, len(payload), 1000):
            yield payload[start:start + 1000]

    oversized = json.dumps({"texts": ["word " * 30] * 40}).encode()
    rejected = {
        "too many texts": client.post("/predict", json={"texts": ["a"] * 9}),
        "text too long": client.post("/predict", json={"texts": ["ok", "x" * 1001]}),
        "no texts": client.post("/predict", json={"texts": []}),
        "not a list": client.post("/predict", json={"texts": "one text"}),
        "not strings": client.post("/predict", json={"texts": [1, 2]}),
        "unknown field": client.post("/predict", json={"texts": ["a"], "top_k": 3}),
        "not JSON": client.post("/predict", content=b"{texts: [",
                                headers={"content-type": "application/json"}),
        "declared too large": client.post("/predict", content=oversized,
                                          headers={"content-type": "application/json"}),
        "streamed too large": client.post("/predict", content=chunked(oversized),
                                          headers={"content-type": "application/json"}),
        "wrong method": client.get("/predict"),
    }
    statuses = {name: reply.status_code for name, reply in rejected.items()}
    assert statuses == {"too many texts": 422, "text too long": 422, "no texts": 422,
                        "not a list": 422, "not strings": 422, "unknown field": 422,
                        "not JSON": 422, "declared too large": 413,
                        "streamed too large": 413, "wrong method": 405}
    assert "4000 bytes" in rejected["declared too large"].json()["detail"]
    assert "4000 bytes" in rejected["streamed too large"].json()["detail"]
    too_long = rejected["text too long"].json()["detail"][0]
    assert too_long["loc"] == ["body", "texts", 1] and "1000 characters" in too_long["msg"]

    assert client.get("/health").json() == {"status": "ok"}
    assert [p["label"] for p in client.post("/predict", json={"texts": texts}).json()[
        "predictions"]] == [label for _, label in clear_cases]

    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # uvicorn re-raises it once shut down
    assert "Application shutdown complete" in process.stderr.read().decode()
    with pytest.raises(httpx.ConnectError):
        httpx.get(str(client.base_url.join("/health")), timeout=5)


def test_service_without_a_run_exits_naming_the_outputs_folder(tmp_path, capsys):
    assert serve_main(["--outputs", str(tmp_path)]) == 2
    assert f"no run under {tmp_path}" in capsys.readouterr().err
