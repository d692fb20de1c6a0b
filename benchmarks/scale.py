"""Server cost against the number of sites: round time, server memory, bytes, aggregation speed.

    python -m benchmarks.scale [--sites 10,100,1000] [--models tiny-bert,minilm-head,minilm-lora]
        [--parts rounds,memory,throughput,secagg] [--memory-sites 10,25,100]
        [--collect-all-sites 10,25] [--round-limit-s 900]

``rounds``: one FedAvg round of the real ServerApp and ClientApps, run in one process
by ``testing/grid.py`` (clients train one after another on this machine, so
the round time is the sum of every site's local step plus the server's work; Ray's
simulation engine adds its own start-up and scheduling on a 2-core machine). Each site
trains one batch of 16 SST-2 sentences of 16 tokens. Prints the round's wall time and
the measured bytes up and down per site from the run's round record. A configuration
whose previous site count took longer than ``--round-limit-s`` is skipped, and the
table says so.

``memory``: the server's aggregation alone, on uploads of MiniLM's real tensor shapes
(dense float32, 90 MB each). Each configuration runs in a fresh process, which reads
N uploads and hands the result to Flower's FedAvg; printed: the growth of the peak
resident set (``VmHWM``) over the process's size before the round, in MB and in model
sizes. ``arrivals only``: the uploads built one at a time and dropped unread, i.e. the
in-flight upload and what building it costs this harness.
``streaming``: uploads arrive one at a time (``server/streaming.py``);
``collect-all``: the N replies are held, as ``Grid.send_and_receive`` returns them,
and decoded into one reply each (``server/uploads.py``) for strategies that read every
update.

``throughput``: decode + check + accumulate of one MiniLM upload (dense float32 and
8-bit), in GB/s of float32 update, against a numpy copy of the same bytes (this
machine's memory bandwidth as one core sees it); best of 5, with torch on one thread
and on its default. Adding a float32 update into a float64 sum moves 5 bytes per
update byte (read the update, read and write the sum) where a copy moves 2, so at
memory speed the add alone runs at about 40 % of the copy's GB/s.

``secagg``: ``benchmarks.secure_aggregation.scale_rows`` at the same site counts
(``--secagg-parameters``, default 100,000): one client's protocol compute and the
server's, apart, and the bytes per client.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from sepal import wire
from sepal.codecs import DenseCodec, build_codec, decode_upload

MODELS = {  # name -> run-config overrides of a round
    "tiny-bert": {"model": "tiny-bert", "learning-rate": 1e-3},
    "tiny-bert-q8": {"model": "tiny-bert", "learning-rate": 1e-3, "upload-codec": "q8"},
    "minilm-head": {"model": "minilm", "trainable": "head", "learning-rate": 1e-3},
    "minilm-lora": {"model": "minilm", "lora": True, "learning-rate": 5e-4},
}
ROUND = {"test-split": "dev", "max-test-examples": 32, "num-server-rounds": 1,
         "max-seq-length": 16, "batch-size": 16, "fraction-evaluate": 0.0}
SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
MB = 1e6


def minilm_shapes() -> OrderedDict[str, tuple[int, ...]]:
    from sepal.model import PACKAGED_MINILM, build_model, get_weights

    weights = get_weights(build_model(PACKAGED_MINILM, ["negative", "positive"], seed=0))
    return OrderedDict((name, array.shape) for name, array in weights.items())


def random_values(shapes) -> np.ndarray:
    total = sum(int(np.prod(s)) for s in shapes.values())
    return (0.01 * np.random.default_rng(0).standard_normal(total)).astype(np.float32)


def synthetic_update(shapes, scale: float, base: np.ndarray) -> OrderedDict[str, np.ndarray]:
    """One site's update: a fixed random pattern times ``scale`` (cheap to vary)."""
    update, offset = OrderedDict(), 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        update[name] = (base[offset:offset + size] * np.float32(scale)).reshape(shape)
        offset += size
    return update


def dense_upload(shapes, scale: float, base: np.ndarray) -> tuple[ArrayRecord, ConfigRecord]:
    """What ``DenseCodec`` uploads, built a tensor at a time (no whole-model temporaries,
    so that the memory rows measure the server, not this generator)."""
    payload, offset = OrderedDict(), 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        payload[name] = wire.npy_array(
            (base[offset:offset + size] * np.float32(scale)).reshape(shape))
        offset += size
    return ArrayRecord(payload), ConfigRecord({"wire-version": wire.WIRE_VERSION,
                                              "codec": DenseCodec.name})


def synthetic_replies(shapes, sites: int, base: np.ndarray):
    """``sites`` dense train replies, each built when the caller asks for it."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    for node in range(1, sites + 1):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        instruction.metadata.__dict__["_message_id"] = f"instruction-{node}"
        payload, params = dense_upload(shapes, 1 + node / sites, base)
        metrics = MetricRecord({wire.NUM_EXAMPLES: 100 + node, "train-loss": 0.5})
        yield Message(RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                                  wire.METRICS_KEY: metrics}), reply_to=instruction)


def memory_probe(shapes_file: str, sites: int, path: str) -> dict:
    """Runs in a fresh process: peak RSS growth of one round's aggregation."""
    import psutil
    from flwr.serverapp.strategy import FedAvg

    from server.streaming import StreamingRound
    from server.uploads import decode_replies
    from server.validation import UpdateValidator

    shapes = OrderedDict((k, tuple(v)) for k, v in json.loads(Path(shapes_file).read_text()))
    global_arrays = OrderedDict((k, np.full(s, 0.01, np.float32)) for k, s in shapes.items())
    model_bytes = sum(a.nbytes for a in global_arrays.values())
    base = random_values(shapes)
    before = psutil.Process().memory_info().rss
    reset_peak_rss()
    started = time.perf_counter()
    if path == "streaming":
        stream = StreamingRound(global_arrays, UpdateValidator(), {})
        for reply in synthetic_replies(shapes, sites, base):
            stream.add(reply)
            del reply
        decoded = stream.finish(wire.ARRAYS_KEY, [Message(RecordDict(), dst_node_id=1,
                                                          message_type="train")])
    elif path == "collect-all":
        decoded = decode_replies(list(synthetic_replies(shapes, sites, base)), global_arrays)
    else:  # the uploads arriving one at a time, nothing read: what the harness itself costs
        for reply in synthetic_replies(shapes, sites, base):
            del reply
        decoded = None
    if decoded is not None:
        arrays, _ = FedAvg().aggregate_train(1, decoded.accepted)
        assert arrays is not None and decoded.clients == sites
    seconds = time.perf_counter() - started
    peak = peak_rss()
    return {"model_mb": model_bytes / MB, "peak_growth_mb": (peak - before) / MB,
            "model_sizes": (peak - before) / model_bytes, "seconds": seconds}


def reset_peak_rss() -> None:
    """Start the peak resident set (Linux ``VmHWM``) over from now: a process started
    by another inherits its peak across exec. /proc, because psutil exposes neither the
    peak nor its reset."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_rows(shapes, streaming_sites: list[int], collect_sites: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        shapes_file = Path(folder) / "shapes.json"
        shapes_file.write_text(json.dumps([[k, list(v)] for k, v in shapes.items()]))
        for path, counts in (("arrivals only", streaming_sites[:1]),
                             ("streaming", streaming_sites), ("collect-all", collect_sites)):
            for sites in counts:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.scale", "--memory-probe",
                     str(shapes_file), str(sites), path],
                    capture_output=True, text=True, check=True)
                rows.append({"path": path, "sites": sites,
                             **json.loads(out.stdout.strip().splitlines()[-1])})
                print_memory_row(rows[-1])
    return rows


def print_memory_row(row: dict) -> None:
    print(f"| {row['path']} | {row['sites']} | {row['model_mb']:.1f} | "
          f"{row['peak_growth_mb']:.0f} | {row['model_sizes']:.2f} | {row['seconds']:.1f} |",
          flush=True)


def best_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def throughput_rows(shapes) -> list[dict]:
    import torch

    rows = []
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        rows += codec_throughput(shapes, threads)
    return rows


def codec_throughput(shapes, threads: int) -> list[dict]:
    from server.streaming import RunningSum, screen
    from server.validation import UpdateValidator

    global_arrays = OrderedDict((k, np.full(s, 0.01, np.float32)) for k, s in shapes.items())
    model_bytes = sum(a.nbytes for a in global_arrays.values())
    source = random_values(shapes)
    target = np.empty_like(source)
    copy_s = best_seconds(lambda: np.copyto(target, source))
    validator, total = UpdateValidator(), RunningSum(global_arrays)
    update = synthetic_update(shapes, 0.01, source)
    rows = []
    for chain in ("dense", "q8"):
        payload, params, _ = build_codec(chain, np.random.default_rng(1)).encode(update, None)

        def one_upload():
            decoded = decode_upload(payload, params, shapes)
            screen(decoded, global_arrays, validator)
            total.add(decoded, 100)

        one_upload()  # the sum's pages are touched once per round, not per upload
        seconds = best_seconds(one_upload)
        decoded = decode_upload(payload, params, shapes)
        rows.append({
            "codec": chain, "model_mb": model_bytes / MB,
            "decode_gbs": model_bytes / best_seconds(
                lambda: decode_upload(payload, params, shapes)) / 1e9,
            "check_gbs": model_bytes / best_seconds(
                lambda: screen(decoded, global_arrays, validator)) / 1e9,
            "add_gbs": model_bytes / best_seconds(lambda: total.add(decoded, 100)) / 1e9,
            "all_gbs": model_bytes / seconds / 1e9, "copy_gbs": model_bytes / copy_s / 1e9})
        row = rows[-1]
        print(f"| {chain} | {threads} | {row['model_mb']:.1f} | {row['decode_gbs']:.1f} | "
              f"{row['check_gbs']:.1f} | {row['add_gbs']:.1f} | {row['all_gbs']:.2f} | "
              f"{row['copy_gbs']:.2f} | {100 * row['all_gbs'] / row['copy_gbs']:.0f} % |",
              flush=True)
    return rows


def round_probe(model: str, sites: int) -> dict:
    """Runs in a fresh process: one in-process FedAvg round; its round record."""
    from testing.grid import app_run_config, run_in_process

    with tempfile.TemporaryDirectory() as folder:
        run_config = app_run_config({
            **ROUND, **MODELS[model], "dataset": str(SST2), "max-train-examples": 16 * sites,
            "min-train-nodes": sites, "min-available-nodes": sites,
            "output-dir": folder, "run-name": "scale"})
        started = time.perf_counter()
        output, _ = run_in_process(run_config, sites)
        total = time.perf_counter() - started
        record = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("round") == 1][0]
    up = list(record["bytes_up_per_client"].values())
    down = list(record["bytes_down_per_client"].values())
    return {"round_s": record["wall_time_s"], "run_s": total, "clients": record["clients"],
            "bytes_up": float(np.mean(up)), "bytes_down": float(np.mean(down))}


def round_rows(models: list[str], sites: list[int], limit_s: float) -> list[dict]:
    rows = []
    for model in models:
        previous = 0.0
        for count in sites:
            if previous > limit_s:
                row = {"model": model, "sites": count, "skipped": f"{previous:.0f} s at the "
                       f"previous size > --round-limit-s {limit_s:.0f}"}
            else:
                out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--round-probe",
                                      model, str(count)], capture_output=True, text=True)
                if out.returncode != 0:
                    row = {"model": model, "sites": count,
                           "skipped": "failed: " + out.stderr.strip().splitlines()[-1][:120]}
                else:
                    row = {"model": model, "sites": count,
                           **json.loads(out.stdout.strip().splitlines()[-1])}
                    previous = row["round_s"]
            rows.append(row)
            if "skipped" in row:
                print(f"| {model} | {count} | not run: {row['skipped']} | | | |", flush=True)
            else:
                print(f"| {model} | {count} | {row['round_s']:.1f} | {row['run_s']:.1f} | "
                      f"{row['bytes_up'] / MB:.3f} | {row['bytes_down'] / MB:.3f} |", flush=True)
    return rows


def secagg_rows(sites: list[int], parameters: int) -> None:
    from benchmarks.secure_aggregation import scale_rows

    print("| sites | parameters | client s | server s | round s | up / client MB | "
          "down / client MB |")
    print("|---|---|---|---|---|---|---|")
    for row in scale_rows(sites, parameters):
        print(f"| {row['sites']} | {row['parameters']} | {row['client_s']:.4f} | "
              f"{row['server_s']:.2f} | {row['round_s']:.2f} | "
              f"{row['bytes_up_per_client'] / MB:.3f} | {row['bytes_down_per_client'] / MB:.3f} |",
              flush=True)


def counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=counts, default=[10, 100, 1000])
    parser.add_argument("--models", default="tiny-bert,minilm-head,minilm-lora")
    parser.add_argument("--parts", default="throughput,memory,rounds,secagg")
    parser.add_argument("--memory-sites", type=counts, default=[10, 100],
                        help="site counts of the streaming memory rows")
    parser.add_argument("--collect-all-sites", type=counts, default=[10, 25],
                        help="site counts of the collect-everything memory rows (each site "
                             "costs about 2 x 90 MB)")
    parser.add_argument("--round-limit-s", type=float, default=900.0)
    parser.add_argument("--secagg-parameters", type=int, default=100_000)
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--round-probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        shapes_file, sites, path = args.memory_probe
        print(json.dumps(memory_probe(shapes_file, int(sites), path)))
        return
    if args.round_probe:
        print(json.dumps(round_probe(args.round_probe[0], int(args.round_probe[1]))))
        return
    parts = args.parts.split(",")
    shapes = minilm_shapes() if {"throughput", "memory"} & set(parts) else None
    if "throughput" in parts:
        print("\nAggregation speed, one MiniLM upload (decode + check + add to the float64 sum)")
        print("| codec | torch threads | model MB | decode GB/s | check GB/s | add GB/s | "
              "all GB/s | numpy copy GB/s | all / copy |")
        print("|---|---|---|---|---|---|---|---|---|")
        throughput_rows(shapes)
    if "memory" in parts:
        print("\nServer aggregation memory, MiniLM dense uploads, FedAvg")
        print("| path | sites | model MB | peak RSS growth MB | x model | seconds |")
        print("|---|---|---|---|---|---|")
        memory_rows(shapes, args.memory_sites, args.collect_all_sites)
    if "rounds" in parts:
        print("\nOne FedAvg round, in-process ServerApp + ClientApps (streaming aggregation)")
        print("| model | sites | round s | run s | up / site MB | down / site MB |")
        print("|---|---|---|---|---|---|")
        round_rows(args.models.split(","), args.sites, args.round_limit_s)
    if "secagg" in parts:
        print(f"\nSecure aggregation, {args.secagg_parameters} parameters")
        secagg_rows(args.sites, args.secagg_parameters)


if __name__ == "__main__":
    main()
