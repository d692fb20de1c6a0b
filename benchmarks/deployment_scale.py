"""Deployment mode at N SuperNodes on one machine: round time and ClientApp start cost.

    python -m benchmarks.deployment_scale --nodes 2,4,8 [--rounds 2] [--workdir DIR]

For every N: one insecure SuperLink and N SuperNodes (``simulations.deployment``),
each SuperNode a share of SST-2 (``partition-id`` / ``num-partitions``), then one
run of tiny BERT training only its classification head (``trainable = "head"``,
16 examples per site, 32-token sentences), every site sampled every round.

Flower 1.42 runs a ClientApp in subprocess isolation: the SuperNode's SuperExec starts
a fresh ``flwr-clientapp`` process for every message, which imports the app (torch,
transformers, Sepal) and builds the model before it handles the message. Measured:

  round s        mean ``wall_time_s`` of the rounds (metrics.jsonl): send, train,
                 collect, aggregate, evaluate on the server's test split
  first round s  round 1 alone (the SuperNodes fetch the app bundle then)
  ClientApps     ``flwr-clientapp`` processes seen under the SuperNodes (polled every
                 0.1 s with psutil), per round
  ClientApp s    mean lifetime of those processes (start to exit)
  ClientApp CPU s  their mean CPU seconds (user + system): the cost of one message,
                 almost all of it start-up, as the training itself is 16 examples
  import CPU s   CPU seconds of a fresh interpreter importing what a train message
                 needs (``client.app``, ``client.training_round``: torch, transformers,
                 Opacus, datasets), median of 3: paid again by every ClientApp process
  RSS MB         the SuperLink's and the SuperNodes' resident memory after the run

All processes share this machine's cores, so with N above the core count the N
ClientApps of a round queue for CPU: round time grows with N here although on N
machines it would not. Times are wall seconds unless they say CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from simulations.deployment import LocalDeployment
from simulations.processes import OFFLINE_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = (PROJECT_ROOT.parent / "shared" / "data" / "sst2").resolve()
EXAMPLES_PER_SITE = 16
RUN = {"model": "tiny-bert", "dataset": str(SST2), "test-split": "dev", "trainable": "head",
       "max-test-examples": 64, "learning-rate": 1e-3, "batch-size": 16,
       "max-seq-length": 32, "round-timeout": 600.0}


class ClientAppWatch(threading.Thread):
    """Polls the process trees of the SuperNodes for ``flwr-clientapp`` processes and
    records each one's lifetime (creation to the first poll that finds it exited) and
    CPU seconds (user + system at its last poll)."""

    def __init__(self, roots: list[int], interval: float = 0.1):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.created: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.ended: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(self.interval)

    def poll(self) -> None:
        running = set()
        for root in self.roots:
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if not any("flwr-clientapp" in part for part in child.cmdline()[:2]):
                        continue
                    self.created.setdefault(child.pid, child.create_time())
                    self.cpu[child.pid] = sum(child.cpu_times()[:2])
                    if child.status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
                        running.add(child.pid)
                except psutil.Error:
                    continue
        now = time.time()
        for pid in set(self.created) - running - set(self.ended):
            self.ended[pid] = now

    def stop(self) -> tuple[list[float], list[float]]:
        """(lifetimes, CPU seconds) of every ClientApp process seen."""
        self.done.set()
        self.join()
        self.poll()
        now = time.time()
        pids = sorted(self.created)
        return ([self.ended.get(pid, now) - self.created[pid] for pid in pids],
                [self.cpu[pid] for pid in pids])


def import_cpu_seconds(repeats: int = 3) -> float:
    """Median CPU seconds of a fresh interpreter importing what a train message needs."""
    times = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "import client.app, client.training_round"],
                       cwd=PROJECT_ROOT, env={**os.environ, **OFFLINE_ENV}, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(times)


def measure(nodes: int, rounds: int, workdir: Path) -> dict:
    config = {**RUN, "num-server-rounds": rounds, "max-train-examples": EXAMPLES_PER_SITE * nodes,
              "min-train-nodes": nodes, "min-available-nodes": nodes,
              "output-dir": str(workdir / "outputs"), "run-name": f"nodes-{nodes}"}
    with LocalDeployment(workdir / "deployment") as deployment:
        superlink = deployment.start_superlink()
        supernodes = [deployment.start_supernode(
            f"supernode-{i}", {"partition-id": i, "num-partitions": nodes, "device": "cpu"})
            for i in range(nodes)]
        for i in range(nodes):
            deployment.wait_for_log(f"supernode-{i}", "SuperNode ID", timeout=300)
        watch = ClientAppWatch([p.pid for p in supernodes])
        watch.start()
        started = time.perf_counter()
        try:
            folder = deployment.run(config, timeout=3600)
        finally:
            lifetimes, cpu = watch.stop()
        total = time.perf_counter() - started
        rss = sum(psutil.Process(p.pid).memory_info().rss for p in [superlink, *supernodes]
                  if psutil.pid_exists(p.pid))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    round_times = [r["wall_time_s"] for r in records if r["round"] >= 1]
    return {"nodes": nodes, "rounds": len(round_times), "run_s": total,
            "round_s": statistics.mean(round_times), "first_round_s": round_times[0],
            "clientapps_per_round": len(lifetimes) / max(1, len(round_times)),
            "clientapp_s": statistics.mean(lifetimes) if lifetimes else float("nan"),
            "clientapp_cpu_s": statistics.mean(cpu) if cpu else float("nan"),
            "rss_mb": rss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="2,4,8",
                        help="comma-separated SuperNode counts, e.g. 2,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so that the SuperLink and SuperNodes started here stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    if not counts or min(counts) < 2:
        parser.error("--nodes: give SuperNode counts of at least 2, e.g. 2,4,8")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sepal-deployment-scale-"))
    startup = import_cpu_seconds()
    print(f"ClientApp imports in a fresh interpreter: {startup:.2f} CPU s (median of 3)\n")
    print("| SuperNodes | rounds | round s | first round s | ClientApps/round | ClientApp s "
          "| ClientApp CPU s | import CPU s | run s | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for nodes in counts:
        row = measure(nodes, args.rounds, workdir / f"nodes-{nodes}")
        print(f"| {nodes} | {row['rounds']} | {row['round_s']:.1f} | {row['first_round_s']:.1f} "
              f"| {row['clientapps_per_round']:.1f} | {row['clientapp_s']:.1f} "
              f"| {row['clientapp_cpu_s']:.1f} | {startup:.2f} "
              f"| {row['run_s']:.0f} | {row['rss_mb']:.0f} |", flush=True)
    print(f"\nlogs: {workdir}")


if __name__ == "__main__":
    main()
