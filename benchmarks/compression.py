"""Compressed uploads on SST-2 with MiniLM: bytes on the wire, accuracy, codec time.

    python -m benchmarks.compression [--part codec|federated|both] [--clients 10]
        [--alpha 0.5] [--rounds 3] [--train-examples 2000]
        [--settings "NAME=CHAIN[; KEY=VALUE ...]" ...]

``codec``: one real MiniLM update (a client's local - global after one round of local
training on its Dirichlet share of SST-2) is encoded with each setting. Prints the
measured serialized upload (a whole train reply, as the server's metrics count it),
its ratio to dense float32, the relative L2 error of one decode, the encode time per
client, and the server's decode time for 100 uploads (decode_upload, then
global + update as the server does before aggregation).

``federated``: the same federation (``--clients`` virtual clients, Dirichlet(alpha)
label skew over ``--train-examples`` SST-2 sentences, ``--rounds`` rounds of FedAvg,
one local epoch, sequence length 64, evaluated on the 872-sentence dev set) once per
setting, on Flower's simulation engine. Prints final accuracy and the mean measured
upload bytes per client per round, read from each run's metrics.jsonl. A setting may
change run-config keys after ``;`` (TOML values), e.g. ``"LoRA + 8-bit=q8; lora=true
learning-rate=5e-4"``: the ratio column always divides by the dense float32 upload of
the *first* row, so a row that exchanges fewer parameters is compared with the full
dense upload.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tomllib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict

from sepal import wire
from sepal.codecs import build_codec, decode_upload, parse_chain
from sepal.codecs.measure import dense_upload_size
from sepal.config import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2"

SETTINGS = OrderedDict([
    ("dense fp32", "dense"),
    ("8-bit", "q8"),
    ("4-bit", "q4"),
    ("top-1% per tensor + 8-bit, EF", "topk:0.01:tensor,ef,q8"),
    ("top-1% per tensor + 4-bit, EF, zlib", "topk:0.01:tensor,ef,q4,zlib"),
    ("top-0.1% per tensor + 4-bit, EF", "topk:0.001:tensor,ef,q4"),
    ("top-0.1% global + 4-bit, EF", "topk:0.001,ef,q4"),
])


def run_config(args: argparse.Namespace) -> dict:
    return {
        "model": args.model, "dataset": str(SST2.resolve()), "train-split": "train",
        "test-split": "dev", "max-train-examples": args.train_examples,
        "num-server-rounds": args.rounds, "local-epochs": 1, "batch-size": 16,
        "max-seq-length": 64, "learning-rate": args.learning_rate,
        "partitioner": "dirichlet", "dirichlet-alpha": args.alpha,
        "min-train-nodes": args.clients, "min-available-nodes": args.clients, "seed": 42,
    }


def real_update(args: argparse.Namespace):
    """One client's update after a round of local training, and its train metrics."""
    from client.local_training import LocalTraining
    from sepal.model import get_weights
    from sepal.settings import Settings
    from sepal.task import NodeData, build_task_model

    cfg = Settings.from_mapping(run_config(args)).run
    labels = ["negative", "positive"]
    initial = get_weights(build_task_model(cfg, labels))
    node = NodeData(partition_id=args.codec_client, num_partitions=args.clients)
    training = LocalTraining(cfg, node, labels, torch.device("cpu"))
    stats = training.run(initial, server_round=1)
    update = OrderedDict((k, (v - initial[k]).astype(np.float32))
                         for k, v in training.local_weights().items())
    metrics = MetricRecord({wire.NUM_EXAMPLES: stats.examples_in_split,
                            "train-loss": stats.loss, "train-accuracy": stats.accuracy,
                            "train-steps": stats.steps})
    return initial, update, metrics, stats


def codec_part(args: argparse.Namespace, settings: OrderedDict) -> None:
    started = time.time()
    initial, update, metrics, stats = real_update(args)
    params_count = sum(v.size for v in update.values())
    print(f"\nreal {args.model} update of client {args.codec_client}: {params_count:,} "
          f"parameters in {len(update)} tensors, {stats.steps} local steps on "
          f"{stats.examples_in_split} examples "
          f"({time.time() - started:.0f} s)")
    shapes = {k: v.shape for k, v in update.items()}
    dense = dense_upload_size(initial, metrics)
    true_norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    print("| setting | chain | upload bytes | x fewer than dense fp32 | rel. L2 error | "
          "encode s/client | server decode s/100 uploads |")
    print("|---|---|---|---|---|---|---|")
    for label, setting in settings.items():
        chain, overrides = parse_setting(setting)
        if overrides:
            print(f"| {label} | `{setting}` | (run-config overrides: federated part only) |")
            continue
        codec = build_codec(chain, np.random.default_rng(0))
        encode_times = []
        for _ in range(args.encode_repeats):
            tick = time.perf_counter()
            payload, params, _ = codec.encode(update, None)
            encode_times.append(time.perf_counter() - tick)
        size = wire.serialized_size(RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                                                wire.METRICS_KEY: metrics}))
        decoded = decode_upload(payload, params, shapes)
        error = np.sqrt(sum(float(np.sum((decoded[k] - update[k]).astype(np.float64) ** 2))
                            for k in update)) / true_norm
        tick = time.perf_counter()
        for _ in range(args.decode_uploads):
            decoded = decode_upload(payload, params, shapes)
            rebuilt = OrderedDict((k, initial[k] + decoded[k]) for k in initial)
        decode_seconds = time.perf_counter() - tick
        del rebuilt
        print(f"| {label} | `{chain}` | {size:,} | {dense / size:.1f} | {error:.3f} | "
              f"{statistics.median(encode_times):.3f} | {decode_seconds:.1f} |", flush=True)
    print(f"dense fp32 reply: {dense:,} bytes; decode column: {args.decode_uploads} uploads, "
          "decode_upload + global + update each")


def federated_part(args: argparse.Namespace, settings: OrderedDict) -> None:
    from simulations.run import run_federated
    from tests.conftest import read_metrics

    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for label, setting in settings.items():
        chain, overrides = parse_setting(setting)
        started = time.time()
        config = {**run_config(args), **overrides, "upload-codec": chain,
                  "output-dir": str(args.output_dir),
                  "run-name": f"compression-{stamp}-{len(rows)}"}
        folder = run_federated(config, args.clients,
                               Path(tempfile.mkdtemp(prefix="sepal-bench-")), {"num-cpus": 1})
        rounds = read_metrics(folder)[1:]
        per_client = [b for r in rounds for b in r["bytes_up_per_client"].values()]
        rows.append((label, setting, rounds[-1], float(np.mean(per_client)),
                     rounds[-1]["bytes_up_dense_fp32"], time.time() - started))
        print(f"{label}: accuracy {rounds[-1]['accuracy']:.4f}, "
              f"{np.mean(per_client):,.0f} B/client/round ({time.time() - started:.0f} s)",
              flush=True)
    base_accuracy, dense = rows[0][2]["accuracy"], rows[0][4]
    print(f"\nSST-2 ({args.train_examples} train sentences, dev 872), {args.model}, "
          f"{args.clients} clients, Dirichlet a={args.alpha}, {args.rounds} rounds x 1 epoch, "
          f"lr {args.learning_rate}, seq 64")
    print("| setting | chain | upload B/client/round | x fewer than dense fp32 | accuracy | "
          "vs first row (points) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for label, setting, last, mean_up, _, seconds in rows:
        print(f"| {label} | `{setting}` | {mean_up:,.0f} | {dense / mean_up:.1f} | "
              f"{last['accuracy']:.4f} | {100 * (last['accuracy'] - base_accuracy):+.2f} | "
              f"{seconds:.0f} |")


def parse_setting(setting: str) -> tuple[str, dict]:
    """``"CHAIN; key=value ..."`` -> (chain, run-config overrides)."""
    chain, _, rest = setting.partition(";")
    overrides = {}
    for pair in rest.split():
        key, _, value = pair.partition("=")
        try:
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as error:
            raise SystemExit(f"--settings: {pair!r} in {setting!r} is not KEY=TOML-VALUE "
                             f"({error})") from error
    return chain.strip(), overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("codec", "federated", "both"), default="both")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--codec-client", type=int, default=8,
                        help="partition whose real update the codec part encodes")
    parser.add_argument("--encode-repeats", type=int, default=3)
    parser.add_argument("--decode-uploads", type=int, default=100)
    parser.add_argument("--settings", nargs="*", metavar="NAME=CHAIN",
                        help="replace the default settings (the first is the baseline row)")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "outputs" / "benchmarks")
    args = parser.parse_args()
    settings = (OrderedDict(s.split("=", 1) for s in args.settings) if args.settings
                else SETTINGS)
    for label, setting in settings.items():  # fail before the first (long) run, not after it
        try:
            parse_chain(parse_setting(setting)[0])
        except ConfigError as error:
            raise SystemExit(f"--settings {label!r}: {error} (a NAME may not contain '=')")
    if args.part in ("codec", "both"):
        codec_part(args, settings)
    if args.part in ("federated", "both"):
        federated_part(args, settings)


if __name__ == "__main__":
    main()
