"""Serving on CPU: MiniLM fine-tuned on SST-2, fp32 vs int8, PyTorch vs ONNX Runtime.

    python -m benchmarks.serving [--run RUN_DIR] [--steps 300] [--requests 200]
        [--threads 1] [--work outputs/benchmark-serving]

The model is ``RUN_DIR/model`` of a finished run or, without ``--run``, MiniLM (mean
pooling, all parameters) fine-tuned centrally for ``--steps`` steps of 16 SST-2 training
sentences (sequence length 64, AdamW, learning rate 1e-4), kept in ``--work`` and reused.
Four formats of that one model are measured through the serving code
(``sepal.inference.Classifier``, tokenization included):

- PyTorch fp32: the exported ``model/``;
- PyTorch int8: ``torch.ao.quantization.quantize_dynamic`` on its Linear layers;
- ONNX fp32: the ONNX export with ONNX Runtime's BERT fusions (``server.export``);
- ONNX int8: the same, dynamically quantized: what ``sepal-export`` writes.

Prints the table: weights on disk, accuracy on the 872-sentence dev set, p50/p95 latency
per request and throughput (texts/s) with requests of 1 text (``--requests`` of them,
dev sentences in turn) and of 32 texts (``--requests / 10`` of them), all on
``--threads`` inference threads after 5 warm-up requests.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sepal.data import TokenizedDataset, load_split, make_loader
from sepal.inference import Classifier, OnnxBackend, TorchBackend
from sepal.model import build_model, load_tokenizer
from sepal.training import train_epochs
from server.export import export_onnx, export_run, fuse_onnx, load_fp32, weights_size

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2"
MAX_LENGTH = 64
BATCH = 16


def fine_tune(run: Path, steps: int, seed: int = 0) -> None:
    """A run-like folder: ``model/`` (tokenizer truncating at 64) and ``config.json``."""
    train = load_split(str(SST2), "train_sentences")
    tokenizer = load_tokenizer("minilm")
    model = build_model("minilm", train.label_names, seed, pooling="auto")
    examples = train.head(steps * BATCH, seed)
    loader = make_loader(TokenizedDataset(examples, tokenizer, MAX_LENGTH), BATCH,
                         shuffle=True, seed=seed)
    started = time.perf_counter()
    stats = train_epochs(model, loader, torch.optim.AdamW(model.parameters(), lr=1e-4), 1,
                         torch.device("cpu"), description="fine-tune")
    print(f"fine-tuned MiniLM: {stats.steps} steps of {BATCH} in "
          f"{time.perf_counter() - started:.0f} s, train accuracy {stats.accuracy:.3f}")
    model.save_pretrained(str(run / "model"))
    exported = copy.copy(tokenizer)
    exported.model_max_length = MAX_LENGTH
    exported.save_pretrained(str(run / "model"))
    (run / "config.json").write_text(json.dumps({"model": "minilm", "max_seq_length": MAX_LENGTH,
                                                 "fine_tune_steps": steps}))


def formats(run: Path, threads: int) -> dict[str, tuple[Classifier, int]]:
    """Each format's classifier and the bytes of its weights on disk."""
    fp32 = Classifier.load(run / "model", threads=threads)
    torch_int8 = torch.ao.quantization.quantize_dynamic(
        load_fp32(run / "model"), {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(torch_int8.state_dict(), run / "pytorch-int8.pt")
    onnx_dir = run / "onnx-fp32"
    onnx_dir.mkdir(exist_ok=True)
    exported = run / "exported.onnx"
    config = fp32.backend.model.config
    export_onnx(fp32.backend.model, fp32.tokenizer, exported)
    fuse_onnx(exported, onnx_dir / "model.onnx", config.num_attention_heads, config.hidden_size)
    exported.unlink()
    int8_dir = export_run(run)

    def like_fp32(backend) -> Classifier:
        return Classifier(fp32.tokenizer, backend, fp32.label_names, fp32.max_length)

    return {
        "PyTorch fp32": (fp32, weights_size(run / "model")),
        "PyTorch int8 (dynamic)": (like_fp32(TorchBackend(torch_int8, "pytorch-int8")),
                                   (run / "pytorch-int8.pt").stat().st_size),
        "ONNX Runtime fp32": (like_fp32(OnnxBackend(onnx_dir / "model.onnx", threads,
                                                    "onnx-fp32")), weights_size(onnx_dir)),
        "ONNX Runtime int8": (Classifier.load(int8_dir, threads=threads),
                              weights_size(int8_dir)),
    }


def latencies(classifier: Classifier, texts: list[str], size: int,
              requests: int) -> tuple[float, float, float]:
    """p50 and p95 seconds per request of ``size`` texts, and texts per second."""
    def request(i: int) -> list[str]:
        return [texts[(i * size + j) % len(texts)] for j in range(size)]

    for i in range(5):
        classifier.predict(request(i))
    times = []
    for i in range(requests):
        batch = request(i)
        started = time.perf_counter()
        classifier.predict(batch)
        times.append(time.perf_counter() - started)
    return (float(np.percentile(times, 50)), float(np.percentile(times, 95)),
            size * requests / sum(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (holding model/)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / "outputs" / "benchmark-serving")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.run is not None:
        run = args.work / args.run.name  # the formats are written here, not into the run
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "model").exists():
            (run / "model").symlink_to((args.run / "model").resolve())
        if (args.run / "config.json").is_file():
            (run / "config.json").write_bytes((args.run / "config.json").read_bytes())
        source = f"the model of run {args.run}"
    else:
        run = args.work / f"minilm-sst2-{args.steps}-steps"
        if not (run / "model" / "config.json").is_file():
            run.mkdir(parents=True, exist_ok=True)
            fine_tune(run, args.steps)
        source = f"MiniLM fine-tuned centrally for {args.steps} steps of {BATCH} SST-2 sentences"
    dev = load_split(str(SST2), "dev")
    rows, max_length = [], 0
    for name, (classifier, size) in formats(run, args.threads).items():
        predicted = np.array([p.label_id for p in classifier.predict(dev.texts)])
        accuracy = float((predicted == dev.labels).mean())
        single = latencies(classifier, dev.texts, 1, args.requests)
        batched = latencies(classifier, dev.texts, 32, max(args.requests // 10, 5))
        rows.append((name, size, accuracy, single, batched))
        max_length = classifier.max_length
        print(f"measured {name}", flush=True)

    print(f"\n{source}; dev set {len(dev)} sentences, max length {max_length}; "
          f"{args.threads} inference thread(s), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| format | weights (MiB) | size vs fp32 | dev accuracy | batch 1 p50 / p95 (ms) "
          "| batch 1 texts/s | batch 32 p50 / p95 (ms) | batch 32 texts/s |")
    print("|---|---|---|---|---|---|---|---|")
    base_size, base_accuracy, base_throughput = rows[0][1], rows[0][2], rows[0][4][2]
    for name, size, accuracy, single, batched in rows:
        print(f"| {name} | {size / 2**20:.1f} | {100 * size / base_size:.0f} % | {accuracy:.4f} "
              f"| {1000 * single[0]:.1f} / {1000 * single[1]:.1f} | {single[2]:.0f} "
              f"| {1000 * batched[0]:.0f} / {1000 * batched[1]:.0f} | {batched[2]:.0f} |")
    name, size, accuracy, _, batched = rows[-1]
    print(f"\n{name} vs PyTorch fp32: {100 * size / base_size:.0f} % of the size (goal <= 30 %), "
          f"{batched[2] / base_throughput:.2f}x throughput at batch 32 (goal >= 2x), "
          f"{100 * (base_accuracy - accuracy):+.2f} accuracy points lost (goal <= 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
