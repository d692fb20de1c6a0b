"""SST-2: centralized fine-tuning vs federated FedAvg with the same passes over the data.

    python -m benchmarks.federated_vs_centralized [--clients 10] [--alpha 0.5] [--rounds 3]
        [--train-examples 2000] [--model minilm]

Both train the same model on the same fixed subset of the GLUE SST-2 train split
(``max-train-examples``, seeded) for ``rounds x local-epochs`` passes and evaluate on
the 872-sentence dev set; the federation splits the subset across ``--clients``
virtual clients with a Dirichlet(alpha) label skew. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from simulations.run import centralized_baseline, last_round, run_federated

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "outputs" / "benchmarks")
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_config = {
        "model": args.model, "dataset": str(SST2.resolve()), "train-split": "train",
        "test-split": "dev", "max-train-examples": args.train_examples,
        "num-server-rounds": args.rounds, "local-epochs": 1, "batch-size": 16,
        "max-seq-length": 64, "learning-rate": args.learning_rate,
        "partitioner": "dirichlet", "dirichlet-alpha": args.alpha,
        "min-train-nodes": args.clients, "min-available-nodes": args.clients,
        "output-dir": str(args.output_dir), "seed": 42,
    }
    rows = []
    started = time.time()
    central = centralized_baseline(run_config, args.output_dir / f"centralized-{stamp}")
    rows.append(("centralized", 1, last_round(central), time.time() - started))

    started = time.time()
    federated = run_federated({**run_config, "run-name": f"federated-{stamp}"}, args.clients,
                              Path(tempfile.mkdtemp(prefix="sepal-bench-")), {"num-cpus": 1})
    rows.append((f"federated FedAvg, Dirichlet a={args.alpha}", args.clients,
                 last_round(federated), time.time() - started))

    print(f"\nSST-2 ({args.train_examples} train examples, dev 872), model {args.model}, "
          f"{args.rounds} rounds x 1 local epoch, batch 16, lr {args.learning_rate}")
    print("| setting | clients | accuracy | macro-F1 | loss | wall s |")
    print("|---|---|---|---|---|---|")
    for name, clients, record, seconds in rows:
        print(f"| {name} | {clients} | {record['accuracy']:.4f} | {record['macro_f1']:.4f} | "
              f"{record['loss']:.4f} | {seconds:.0f} |")
    gap = rows[0][2]["accuracy"] - rows[1][2]["accuracy"]
    print(f"accuracy gap (centralized - federated): {100 * gap:.2f} points")


if __name__ == "__main__":
    main()
