"""SST-2 accuracy of FedAvg vs robust aggregators when some clients poison their updates.

    python -m benchmarks.robustness [--clients 10] [--attackers 2] [--rounds 2]
        [--local-epochs 2] [--learning-rate 2e-4] [--train-examples 1000]
        [--test-examples 300] [--model minilm]
        [--strategies fedavg fedmedian krum fedtrimmedavg]
        [--attacks none scale:100 sign-flip:10] [--with-validation]

Every run uses the same seeded IID split of ``--train-examples`` SST-2 sentences over
``--clients`` simulated clients, the same rounds and the same evaluation (the first
``--test-examples`` of the dev set, seeded). Partitions ``0 .. attackers-1`` attack
(``testing.attacks``: their uploads are rewritten on the way to the server): ``scale:S``
uploads ``S x update`` (a boosted update), ``sign-flip:S`` uploads ``-S x update``;
``none`` is the clean baseline, run for FedAvg only (``--clean-for-all`` runs it for
every strategy). The server's norm check (``validation-norm-multiple``) is off, so the
table compares the aggregators alone; ``--with-validation`` adds FedAvg with the check on. Every round samples all
clients and aggregates when at least the ``clients - attackers`` honest ones sent valid
updates (``min-train-nodes``), so rejecting the attackers does not skip the round.
Krum and MultiKrum are told the number of attackers (``num-malicious-nodes``), the
trimmed mean cuts that fraction from each end (``beta``). The ServerApp and the
ClientApps run in this process (``testing.grid``), the clients one after the other.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from simulations.run import last_round
from testing.attacks import poisoned, scaled
from testing.grid import app_run_config, run_in_process

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2"
LABELS = {"scale": "scaled x{s}", "sign-flip": "sign-flipped x-{s}", "none": "no attack"}


def parse_attack(spec: str) -> tuple[str, float]:
    mode, _, factor = spec.partition(":")
    if mode not in LABELS or (mode == "none") != (factor == ""):
        raise SystemExit(f"--attacks: {spec!r} must be 'none', 'scale:S' or 'sign-flip:S'")
    return mode, float(factor or 1.0)


def strategy_params(name: str, clients: int, attackers: int) -> str:
    if name in ("krum", "multikrum", "bulyan"):
        return f"num-malicious-nodes={attackers}"
    if name == "fedtrimmedavg":
        return f"beta={attackers / clients:g}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=300)
    parser.add_argument("--max-seq-length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--strategies", nargs="+",
                        default=["fedavg", "fedmedian", "krum", "fedtrimmedavg"])
    parser.add_argument("--attacks", nargs="+", default=["none", "scale:100", "sign-flip:10"])
    parser.add_argument("--with-validation", action="store_true")
    parser.add_argument("--clean-for-all", action="store_true")
    parser.add_argument("--output-dir", type=Path,
                        default=PROJECT_ROOT / "outputs" / "benchmarks" / "robustness")
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = {
        "model": args.model, "dataset": str(SST2.resolve()), "test-split": "dev",
        "max-train-examples": args.train_examples, "max-test-examples": args.test_examples,
        "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
        "learning-rate": args.learning_rate,
        "batch-size": 16, "max-seq-length": args.max_seq_length, "partitioner": "iid",
        # all clients are sampled; a round aggregates once the honest ones are valid
        "min-train-nodes": args.clients - args.attackers, "min-available-nodes": args.clients,
        "validation-norm-multiple": 0.0,
        "checkpoint-keep": 0, "output-dir": str(args.output_dir), "seed": 42,
    }
    settings = [(name, "off") for name in args.strategies]
    if args.with_validation:
        settings.append(("fedavg", "10x median"))
    results: dict[tuple[str, str, str], tuple[dict, float]] = {}
    attacks = [parse_attack(spec) for spec in args.attacks]
    for attack, factor in attacks:
        tamper = {} if attack == "none" else {
            p: poisoned(scaled(factor if attack == "scale" else -factor))
            for p in range(args.attackers)}
        for name, validation in settings:
            if attack == "none" and (name, validation) != ("fedavg", "off") and \
                    not args.clean_for_all:
                continue
            started = time.time()
            config = {**base, "strategy": name,
                      "strategy-params": strategy_params(name, args.clients, args.attackers),
                      "run-name": f"{stamp}-{attack}-{name}-validation-{validation[:2]}"}
            if validation != "off":
                config["validation-norm-multiple"] = 10.0
            folder, _ = run_in_process(app_run_config(config), args.clients, tamper)
            results[(attack, name, validation)] = (last_round(folder), time.time() - started)
            record = results[(attack, name, validation)][0]
            print(f"{attack:9s} {name:14s} validation {validation:10s} accuracy "
                  f"{record['accuracy']:.4f}  ({time.time() - started:.0f} s)", flush=True)

    columns = [LABELS[attack].format(s=f"{factor:g}") for attack, factor in attacks]
    print(f"\nSST-2, {args.model}, in-process, {args.clients} clients "
          f"({args.attackers} attacking), IID "
          f"{args.train_examples} train sentences, {args.rounds} rounds x {args.local_epochs} "
          f"local epochs, lr {args.learning_rate}, "
          f"accuracy on {args.test_examples} dev sentences")
    print("| strategy | server norm check | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, validation in settings:
        cells = []
        for attack, _ in attacks:
            if (attack, name, validation) not in results:
                cells.append("-")
                continue
            record, _ = results[(attack, name, validation)]
            rejected = f", {record['rejected']} rejected" if record.get("rejected") else ""
            cells.append(f"{record['accuracy']:.4f}{rejected}")
        print(f"| {name} ({strategy_params(name, args.clients, args.attackers) or 'defaults'}) "
              f"| {validation} | " + " | ".join(cells) + " |")
    print(f"total wall time {sum(s for _, s in results.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
