"""One secure-aggregation round: per-client and server cost, and Flower's SecAggPlusWorkflow.

    python -m benchmarks.secure_aggregation [--params 100000] [--clients 10 100 1000]
        [--value-bits 16] [--authenticated both] [--flower-max-work 0] [--repeats 1]

What is measured: one round of the protocol run in this process through
``testing.grid.InProcessGrid`` (no Ray, no SuperLink): the real server code
(Sepal's ``SecureAggregation``) and the real client code (Sepal's ClientApp
handlers), all clients one after the other on one core. Each client is an
institution with its own Ed25519 identity and the federation's roster in its node
config, as ``sepal-provision`` issues them. Every message content is serialized to
Flower's protobuf and back; that serialization is timed separately and left out of
the protocol times (its cost shows in the bytes). "Training" is free: each client
returns the same fixed random update.

Printed per configuration:
  up/client, down/client  mean serialized bytes a client sends / receives over all stages
  client s                mean protocol compute of one client over the round
  server s                the server's protocol compute
  latency s               server compute + for every stage the slowest client's compute
                          (clients in parallel, network free): what a round takes
  auth                    with ``secagg-authenticated`` on: signing, verification and the
                          consistency stage; ``--authenticated both`` also runs the round
                          without them and prints the latency difference as a share of the
                          authenticated round's latency
  sig ops                 the signature work on a client's critical path (2 signatures and
                          2k verifications, timed here) as a share of the latency

Times are CPU seconds of this process (CLOCK): the work is single-threaded (numpy,
OpenSSL), and on a machine whose cores are shared with other jobs wall time measures
the others. With ``--repeats N`` every run is repeated and the fastest is reported.

Flower's legacy ``SecAggPlusWorkflow`` (``LegacyContext``, legacy FedAvg,
``secaggplus_mod`` around a ``NumPyClient``) runs where params * clients <=
``--flower-max-work``, with the same neighbourhood size rounded up to an odd share
count (Flower's graph needs one) and the same threshold. A Flower round counts only
if its aggregate equals the clients' update; otherwise the row says it failed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import register_secure_aggregation
from sepal import wire
from sepal.codecs import DenseCodec
from sepal.secagg import graph
from sepal.secagg.config import SecAggConfig
from sepal.secagg.identity import issue_identities, keys_statement, new_signing_key
from server.secure_aggregation import SecureAggregation
from testing.grid import InProcessGrid

TENSORS = 8
CLOCK = time.process_time


def model_update(params: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [params // TENSORS] * TENSORS
    sizes[-1] += params - sum(sizes)
    return OrderedDict((f"layer{i}.weight", rng.normal(0, 0.01, size).astype(np.float32))
                       for i, size in enumerate(sizes))


def timing(grid: InProcessGrid, total: float, clients: int) -> dict[str, float]:
    wire_s = sum(e.wire_seconds for e in grid.exchanges)
    client_s = sum(sum(e.client_seconds.values()) for e in grid.exchanges)
    slowest = sum(max(e.client_seconds.values(), default=0.0) for e in grid.exchanges)
    server_s = total - wire_s - client_s
    return {"client": client_s / clients, "server": server_s, "latency": server_s + slowest}


def run_sepal(params: int, clients: int, update, config: SecAggConfig, folder: Path) -> dict:
    def train(msg: Message, context: Context) -> Message:
        payload, codec, _ = DenseCodec().encode(update, None)
        metrics = MetricRecord({wire.NUM_EXAMPLES: 500, "train-loss": 0.5,
                                "train-accuracy": 0.5})
        return Message(RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: codec,
                                   wire.METRICS_KEY: metrics}), reply_to=msg)

    app = ClientApp()
    register_secure_aggregation(app, train)
    nodes = list(range(1, clients + 1))
    sites = {}
    if config.secagg_authenticated:
        issued = issue_identities(folder, [f"site-{n}" for n in nodes])
        sites = {n: issued[f"site-{n}"] for n in nodes}
    run_config = {"secure-aggregation": True, **{k.replace("_", "-"): v
                                               for k, v in vars(config).items()}}
    grid = InProcessGrid(app, {node: sites.get(node, {}) for node in nodes}, run_config,
                         clock=CLOCK)
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
    expected = np.clip(np.concatenate([u.ravel() for u in update.values()]),
                       -config.secagg_clip, config.secagg_clip)  # clients clip to [-c, c]
    step = config.secagg_clip / (2 ** (config.secagg_value_bits - 1) - 1)
    if np.abs(result.mean_update - expected).max() > 2 * step:
        raise RuntimeError("Sepal round returned a wrong aggregate")
    return {"up": np.mean(list(grid.bytes_up.values())),
            "down": np.mean(list(grid.bytes_down.values())), "bits": result.sum_bits,
            "shares": result.neighbours + 1, "threshold": result.threshold,
            **timing(grid, total, clients)}


def scale_rows(sites: list[int], parameters: int) -> list[dict]:
    """One authenticated round (the defaults of ``SecAggConfig``) per site count.

    Keys: sites, parameters, client_s (mean CPU seconds of one client over the round),
    server_s (the server's CPU seconds), bytes_up_per_client, bytes_down_per_client
    (mean serialized bytes) and round_s (the latency: server + the slowest client of
    every stage).
    """
    update = model_update(parameters)
    config = SecAggConfig(secure_aggregation=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for count in sites:
            row = run_sepal(parameters, count, update, config,
                            Path(tempfile.mkdtemp(dir=scratch)))
            rows.append({"sites": count, "parameters": parameters,
                         "client_s": float(row["client"]), "server_s": float(row["server"]),
                         "bytes_up_per_client": float(row["up"]),
                         "bytes_down_per_client": float(row["down"]),
                         "round_s": float(row["latency"])})
            gc.collect()
    return rows


def run_flower(params: int, clients: int, update, shares: int, threshold: int) -> dict:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
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
    grid = InProcessGrid(app, {node: {} for node in nodes}, {}, clock=CLOCK)
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
    workflow = SecAggPlusWorkflow(num_shares=min(shares | 1, clients),
                                  reconstruction_threshold=threshold, timeout=3600)
    started = CLOCK()
    workflow(grid, context)
    total = CLOCK() - started
    aggregate = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    if len(aggregate) != len(arrays) or not all(
            np.allclose(a, b, atol=1e-3) for a, b in zip(aggregate, arrays)):
        raise RuntimeError("Flower's round did not produce the aggregate")
    return {"up": np.mean(list(grid.bytes_up.values())),
            "down": np.mean(list(grid.bytes_down.values())), **timing(grid, total, clients)}


def signature_seconds(neighbours: int, repeats: int = 200) -> float:
    """CPU seconds of 2 Ed25519 signatures and 2k verifications (a client's share)."""
    key = new_signing_key()
    statement = keys_statement(b"c" * 40, 1, "site-1", b"e" * 32, b"m" * 32)
    signature = key.sign(statement)
    public = key.public_key()
    started = CLOCK()
    for _ in range(repeats):
        key.sign(statement)
    sign = (CLOCK() - started) / repeats
    started = CLOCK()
    for _ in range(repeats):
        public.verify(signature, statement)
    verify = (CLOCK() - started) / repeats
    return 2 * sign + 2 * neighbours * verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--value-bits", type=int, nargs="+", default=[16])
    parser.add_argument("--authenticated", choices=("on", "off", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=1, help="report the fastest of N runs")
    parser.add_argument("--flower-max-work", type=float, default=0,
                        help="run Flower where params * clients is at most this")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.CRITICAL)

    print("| params | clients | shares/t | q | b | auth | up/client MB | down/client MB "
          "| client s | server s | latency s | auth cost | sig ops | Flower up/client MB "
          "| Flower client s | Flower latency s |")
    print("|---" * 16 + "|")
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.authenticated]
    with tempfile.TemporaryDirectory() as scratch:
        for params in args.params:
            update = model_update(params)
            for clients in args.clients:
                for value_bits in args.value_bits:
                    rows = {}
                    for authenticated in modes:
                        config = SecAggConfig(secure_aggregation=True,
                                              secagg_value_bits=value_bits,
                                              secagg_authenticated=authenticated)
                        rows[authenticated] = fastest(args.repeats, lambda: run_sepal(
                            params, clients, update, config,
                            Path(tempfile.mkdtemp(dir=scratch))))
                    flower = None
                    if params * clients <= args.flower_max_work:
                        first = next(iter(rows.values()))
                        try:
                            flower = fastest(args.repeats, lambda: run_flower(
                                params, clients, update, first["shares"], first["threshold"]))
                        except RuntimeError as err:
                            flower = {"failed": str(err)}
                    for authenticated, row in rows.items():
                        print_row(params, clients, value_bits, authenticated, row,
                                  rows.get(False) if authenticated else None, flower)
                        flower = None  # printed once per configuration
    print(f"\nk = {graph.LOG_FACTOR} ceil(log2 n) neighbours (complete graph when >= n - 1); "
          f"clip {SecAggConfig.secagg_clip}; CPU seconds; times exclude protobuf "
          "serialization of messages.")


def fastest(repeats: int, run) -> dict:
    runs = []
    for _ in range(repeats):
        runs.append(run())
        gc.collect()
    return min(runs, key=lambda r: r["latency"])


def print_row(params: int, clients: int, value_bits: int, authenticated: bool, ours: dict,
              plain: dict | None, flower: dict | None) -> None:
    if authenticated:
        signatures = signature_seconds(ours["shares"] - 1)
        cost = f"{100 * (ours['latency'] - plain['latency']) / ours['latency']:+.1f}%" \
            if plain else "-"
        auth = f"on | {cost} | {100 * signatures / ours['latency']:.2f}%"
    else:
        auth = "off | - | -"
    columns = [f"{params:,}", str(clients), f"{ours['shares']}/{ours['threshold']}",
               str(value_bits), str(ours["bits"])]
    columns += [auth.split(" | ")[0], f"{ours['up'] / 1e6:.3f}", f"{ours['down'] / 1e6:.3f}",
                f"{ours['client']:.4f}", f"{ours['server']:.2f}", f"{ours['latency']:.2f}",
                *auth.split(" | ")[1:]]
    if flower is None:
        columns += ["not run", "not run", "not run"]
    elif "failed" in flower:
        columns += [f"failed: {flower['failed']}", "-", "-"]
    else:
        columns += [f"{flower['up'] / 1e6:.3f}", f"{flower['client']:.4f}",
                    f"{flower['latency']:.2f}"]
    print("| " + " | ".join(columns) + " |", flush=True)


if __name__ == "__main__":
    main()
