"""SST-2 accuracy of federated fine-tuning with and without DP-SGD, same rounds.

    python -m benchmarks.dp_accuracy [--clients 10] [--rounds 3] [--train-examples 2000]
                                     [--epsilon 8] [--delta 1e-5] [--model minilm]
                                     [--pooling auto] [--trainable all]
                                     [--lora] [--lora-r 8] [--lora-target-modules query,value]
                                     [--learning-rate 5e-5] [--batch-size 16]
                                     [--local-epochs 1] [--max-grad-norm 1.0]
                                     [--cpus-per-client 1]

Two federated runs on Flower's simulation engine with identical settings (Dirichlet
alpha=0.5 shares of the first ``--train-examples`` SST-2 training phrases, evaluated on
the 872-sentence dev set) except that the second trains every client under Opacus DP-SGD
with ε = ``--epsilon`` per client at δ = ``--delta`` over the whole run. ``--lora`` makes
both runs fine-tune LoRA adapters + classifier, ``--trainable head`` only the classifier on
the frozen encoder. Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from simulations.run import PROJECT_ROOT, run_federated
from tests.conftest import read_metrics

SST2 = (PROJECT_ROOT.parent / "shared" / "data" / "sst2").resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--pooling", default="auto", choices=("auto", "cls", "mean"))
    parser.add_argument("--trainable", default="all", choices=("all", "head"))
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-target-modules", default="query,value")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "outputs")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="Ray CPUs per virtual client (2 on 2 cores: one client at a time)")
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {
        "model": args.model, "pooling": args.pooling, "trainable": args.trainable,
        "dataset": str(SST2), "test-split": "dev",
        "max-train-examples": args.train_examples, "partitioner": "dirichlet",
        "dirichlet-alpha": 0.5, "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
        "learning-rate": args.learning_rate, "batch-size": args.batch_size, "max-seq-length": 64,
        "lora": args.lora, "lora-r": args.lora_r,
        "lora-target-modules": args.lora_target_modules,
        "min-train-nodes": args.clients, "min-available-nodes": args.clients,
        "output-dir": str(args.output_dir),
    }
    runs = {
        "federated, no DP": {},
        f"federated, DP-SGD ε={args.epsilon:g}": {
            "dp-sgd": True, "dp-target-epsilon": args.epsilon, "dp-delta": args.delta,
            "dp-max-grad-norm": args.max_grad_norm},
    }
    rows = []
    for label, extra in runs.items():
        name = f"dp-accuracy-{'dp' if extra else 'plain'}-{stamp}"
        started = time.time()
        folder = run_federated({**common, **extra, "run-name": name}, args.clients,
                               Path(tempfile.mkdtemp(prefix="sepal-dp-acc-")),
                               {"num-cpus": args.cpus_per_client}, timeout=6 * 3600)
        last = read_metrics(folder)[-1]
        epsilons = list(last.get("epsilon_per_client", {}).values())
        rows.append((label, last, max(epsilons) if epsilons else None,
                     time.time() - started, folder))

    print(f"\nSST-2, {args.clients} clients, Dirichlet alpha=0.5 over {args.train_examples} "
          f"training phrases, {args.rounds} rounds x {args.local_epochs} local epoch(s), "
          f"model {args.model} (pooling {args.pooling}, trainable {args.trainable})"
          f"{f' + LoRA r={args.lora_r} on {args.lora_target_modules}' if args.lora else ''}, "
          f"batch {args.batch_size}, "
          f"lr {args.learning_rate:g}, clip {args.max_grad_norm:g}, dev set (872)\n")
    print("| run | accuracy | macro-F1 | max client ε (δ) | wall time | outputs |")
    print("|---|---|---|---|---|---|")
    for label, last, epsilon, seconds, folder in rows:
        spent = f"{epsilon:.2f} ({args.delta:g})" if epsilon is not None else "-"
        print(f"| {label} | {last['accuracy']:.4f} | {last['macro_f1']:.4f} | {spent} | "
              f"{seconds / 60:.1f} min | {folder} |")
    gap = (rows[0][1]["accuracy"] - rows[1][1]["accuracy"]) * 100
    print(f"\nDP costs {gap:.1f} accuracy points.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
