"""One secure-aggregation round: Sepal's SecAgg+ vs Flower's legacy SecAggPlusWorkflow.

    python -m benchmarks.secure_aggregation [--params 1000000 22700000] [--clients 10 50]
        [--value-bits 16 8] [--flower-max-work 230000000] [--repeats 1]

What is measured, for both implementations alike: one round of the protocol run
in this process through ``simulations.loopback.LoopbackGrid`` (no Ray, no
SuperLink): the real server code (Sepal's ``SecureAggregation`` / Flower's
``SecAggPlusWorkflow`` with a ``LegacyContext`` and legacy FedAvg) and the real
client code (Sepal's ClientApp handlers / Flower's ``secaggplus_mod`` around a
``NumPyClient``), all clients one after the other on one core. Every message
content is serialized to Flower's protobuf and back; that serialization is timed
separately and left out of the protocol times (its cost shows in the bytes), and
the bytes are counted by the grid for both (Sepal's own per-message byte
accounting, which Flower's workflow does not have, is switched off).
"Training" is free in both: each client returns the same fixed random update.

Printed per configuration:
  upload/client  mean serialized bytes of a client's replies over all stages
  serial s       protocol compute of the round, every client and the server in turn
                 (CPU seconds of this process: see CLOCK)
  latency s      server compute + for every stage the slowest client's compute (clients
                 in parallel, network free): what a round would take in a federation
  vs plain b     upload / plaintext fixed-point upload at the same b bits
  vs plain q     upload / plaintext upload at the q value bits (no room for the sum)

Sepal runs at each ``--value-bits`` q (16: the default; 8: as behind an 8-bit
quantizing codec); Flower's cost does not depend on it and runs once per size.
With ``--repeats N`` every run is repeated and the fastest is reported (the machine's
other jobs only ever add time). Both use the same neighbourhood size (k + 1 shares
per client) and threshold t; Flower keeps its defaults otherwise (clip 8, 2^22
levels, masks mod 2^32, int64 on the wire). Flower runs are skipped where
params * clients > --flower-max-work (its int64 replies need memory and time
that grow with both); the table says so.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections import OrderedDict

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import register_secure_aggregation
from sepal import wire
from sepal.codecs import DenseCodec
from sepal.secagg import graph
from sepal.secagg.config import SecAggConfig
from sepal.secagg.fixedpoint import sum_bits
from sepal.secagg.packing import packed_size
from server.secure_aggregation import SecureAggregation
from simulations.loopback import LoopbackGrid

TENSORS = 8
# CPU seconds of this process: the work is single-threaded (numpy elementwise, OpenSSL),
# and on a machine whose cores are shared with other jobs wall time measures the others.
CLOCK = time.process_time


def model_update(params: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [params // TENSORS] * TENSORS
    sizes[-1] += params - sum(sizes)
    return OrderedDict((f"layer{i}.weight", rng.normal(0, 0.01, size).astype(np.float32))
                       for i, size in enumerate(sizes))


def timing(grid: LoopbackGrid, total: float) -> dict[str, float]:
    wire_s = sum(e.wire_seconds for e in grid.exchanges)
    client_s = sum(sum(e.client_seconds.values()) for e in grid.exchanges)
    slowest = sum(max(e.client_seconds.values(), default=0.0) for e in grid.exchanges)
    server_s = total - wire_s - client_s
    return {"serial": total - wire_s, "latency": server_s + slowest, "server": server_s,
            "wire": wire_s}


def run_sepal(params: int, clients: int, update, config: SecAggConfig) -> dict:
    def train(msg: Message, context: Context) -> Message:
        payload, codec, _ = DenseCodec().encode(update, None)
        metrics = MetricRecord({wire.NUM_EXAMPLES: 500, "train-loss": 0.5,
                                "train-accuracy": 0.5})
        return Message(RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: codec,
                                   wire.METRICS_KEY: metrics}), reply_to=msg)

    app = ClientApp()
    register_secure_aggregation(app, train)
    nodes = list(range(1, clients + 1))
    run_config = {"secure-aggregation": True, **{k.replace("_", "-"): v
                                               for k, v in vars(config).items()}}
    grid = LoopbackGrid(app, nodes, run_config, clock=CLOCK)
    zeros = wire.arrays_to_record(OrderedDict((k, np.zeros_like(v)) for k, v in update.items()))
    messages = [Message(RecordDict({wire.ARRAYS_KEY: zeros,
                                    wire.CONFIG_KEY: ConfigRecord({"server-round": 1})}),
                        node, "train") for node in nodes]
    started = CLOCK()
    result = SecureAggregation(grid, config, train_timeout=3600, count_bytes=False).run(
        messages, params)
    total = CLOCK() - started
    if result.aborted or len(result.contributors) != clients:
        raise RuntimeError(f"Sepal round failed: {result.aborted}")
    return {"bytes": np.mean(list(grid.bytes_up.values())), "bits": result.sum_bits,
            "shares": result.neighbours + 1, "threshold": result.threshold,
            **timing(grid, total)}


def run_flower(params: int, clients: int, update, shares: int, threshold: int) -> dict:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    arrays = list(update.values())

    class BenchClient(NumPyClient):
        def fit(self, parameters, config):
            return arrays, 500, {}

    app = ClientApp(client_fn=lambda context: BenchClient().to_client(), mods=[secaggplus_mod])
    nodes = list(range(1, clients + 1))
    grid = LoopbackGrid(app, nodes, {}, clock=CLOCK)
    strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                            min_available_clients=clients)
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    for node in nodes:
        context.client_manager.register(GridClientProxy(node_id=node, grid=grid, run_id=1))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros_like(a) for a in arrays]), True)
    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                  timeout=3600)
    started = CLOCK()
    workflow(grid, context)
    total = CLOCK() - started
    if len(grid.bytes_up) != clients or context.history.metrics_distributed_fit is None:
        raise RuntimeError("Flower round did not complete")
    return {"bytes": np.mean(list(grid.bytes_up.values())), **timing(grid, total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, nargs="+", default=[1_000_000, 22_700_000])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--value-bits", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--repeats", type=int, default=1, help="report the fastest of N runs")
    parser.add_argument("--flower-max-work", type=float, default=230e6,
                        help="skip Flower where params * clients exceeds this")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    print("| params | clients | shares/t | q | b | upload/client MB: Sepal | Flower | fewer bytes "
          "| serial s: Sepal | Flower | latency s: Sepal | Flower | less time (latency) "
          "| Sepal vs plain b | vs plain q | vs fp32 |")
    print("|---" * 16 + "|")
    for params in args.params:
        update = model_update(params)
        for clients in args.clients:
            theirs = None
            for value_bits in args.value_bits:
                config = SecAggConfig(secure_aggregation=True, secagg_value_bits=value_bits)
                ours = fastest(args.repeats, lambda: run_sepal(params, clients, update, config))
                if theirs is None and params * clients <= args.flower_max_work:
                    theirs = fastest(args.repeats, lambda: run_flower(
                        params, clients, update, ours["shares"], ours["threshold"]))
                print_row(params, clients, config, ours, theirs)
    print(f"\nk = {graph.LOG_FACTOR} ceil(log2 n) neighbours (complete graph when >= n - 1); "
          f"clip {SecAggConfig.secagg_clip}; times exclude protobuf serialization of messages.")


def fastest(repeats: int, run) -> dict:
    """Figures of the lowest-latency run of ``repeats``; the lowest serial time of all."""
    runs = []
    for _ in range(repeats):
        runs.append(run())
        gc.collect()
    best = min(runs, key=lambda r: r["latency"])
    return {**best, "serial": min(r["serial"] for r in runs)}


def print_row(params: int, clients: int, config: SecAggConfig, ours: dict, theirs: dict | None):
    if theirs is not None:
        flower = (f"{theirs['bytes'] / 1e6:.2f} | {theirs['bytes'] / ours['bytes']:.1f}x "
                  f"| {ours['serial']:.1f} | {theirs['serial']:.1f} "
                  f"| {ours['latency']:.2f} | {theirs['latency']:.2f} "
                  f"| {theirs['latency'] / ours['latency']:.1f}x")
    else:
        flower = (f"not run | - | {ours['serial']:.1f} | not run | {ours['latency']:.2f} "
                  "| not run | -")
    bits = ours["bits"]
    assert bits == sum_bits(config.secagg_value_bits, clients)
    plain_b = packed_size(params, bits)
    plain_q = params * config.secagg_value_bits / 8
    print(f"| {params:,} | {clients} | {ours['shares']}/{ours['threshold']} "
          f"| {config.secagg_value_bits} | {bits} | {ours['bytes'] / 1e6:.2f} | {flower} "
          f"| {ours['bytes'] / plain_b:.3f} | {ours['bytes'] / plain_q:.2f} "
          f"| {ours['bytes'] / (4 * params):.2f} |", flush=True)


if __name__ == "__main__":
    main()
