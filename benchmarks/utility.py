"""What a private Sepal model is worth: centralized, federated, DP-SGD, and the full
private pipeline (DP-SGD + secure aggregation at 8 value bits), on one table.

    python -m benchmarks.utility [--dataset ../shared/data/sst2] [--rows a,b,c,d,e]
                                 [--seeds 1] [--train-examples 20000]

Rows (every row makes the same passes over the same examples, ``rounds x local-epochs``):

  a  centralized, non-private (LoRA, the non-private optimizer settings)
  b  federated, non-private (10 sites, Dirichlet label skew)
  c  federated, DP-SGD at ε = 8 per site, LoRA (the private preset without secure aggregation)
  d  the private preset: c + secure aggregation at 8 value bits
  e  federated, DP-SGD at ε = 8 per site, full fine-tuning (ghost clipping)

Columns: accuracy, macro-F1 and worst per-class recall on the test split after the last
round, upload bytes per site per round, the largest site ε, wall time. Each federated
row is a real Flower simulation of ``simulations/configs/private.toml`` with overrides.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.run import (
    PROJECT_ROOT,
    centralized_baseline,
    last_round,
    load_experiment,
    run_federated,
)

PRESET = PROJECT_ROOT / "simulations" / "configs" / "private.toml"
NON_PRIVATE = {"dp-sgd": False, "secure-aggregation": False, "learning-rate": 5e-4,
               "head-learning-rate": 5e-3, "batch-size": 32, "physical-batch-size": 0}
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "a": ("centralized, non-private", NON_PRIVATE),
    "b": ("federated, non-private", NON_PRIVATE),
    "c": ("federated, DP-SGD ε=8, LoRA", {"secure-aggregation": False}),
    "d": ("private preset: DP-SGD + SecAgg 8-bit", {}),
    "e": ("federated, DP-SGD ε=8, full fine-tuning", {
        "secure-aggregation": False, "lora": False, "learning-rate": 1e-4}),
}


def preset_run_config(dataset: str, train_examples: int, test_split: str,
                      overrides: list[str]) -> dict[str, Any]:
    """The private preset's run config with ``--set`` overrides, as ``sepal-simulate``
    reads it, on ``dataset``."""
    config = load_experiment(PRESET, overrides)["run-config"]
    config.update({"dataset": str(Path(dataset).resolve()), "test-split": test_split,
                   "max-train-examples": train_examples})
    return config


def run_row(row: str, base: dict[str, Any], sites: int, seed: int, output: Path) -> dict[str, Any]:
    label, overrides = ROWS[row]
    config = {**base, **overrides, "seed": seed, "output-dir": str(output),
              "run-name": f"utility-{row}-seed{seed}-{time.strftime('%H%M%S')}",
              "min-available-nodes": sites}
    started = time.time()
    if row == "a":
        folder = centralized_baseline(config, output / config["run-name"])
    else:
        folder = run_federated(config, sites, Path(tempfile.mkdtemp(prefix="sepal-utility-")),
                               {"num-cpus": 1}, timeout=6 * 3600)
    wall = time.time() - started
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    final = last_round(folder)
    uploads = [b for r in rounds for b in r.get("bytes_up_per_client", {}).values()]
    epsilons = final.get("epsilon_per_client", {})
    return {
        "row": row, "label": label, "seed": seed, "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"], "worst_recall": final.get("worst_class_recall"),
        "upload_bytes": statistics.mean(uploads) if uploads else None,
        "max_epsilon": max(epsilons.values()) if epsilons else None,
        "wall_s": wall, "folder": str(folder),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| row | setting | seeds | accuracy | macro-F1 | worst-class recall | "
             "upload B/site/round | max site ε | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted({r["row"] for r in results}):
        runs = [r for r in results if r["row"] == row]
        lines.append(
            f"| {row} | {runs[0]['label']} | {len(runs)} | {_mean(runs, 'accuracy', '.4f')} | "
            f"{_mean(runs, 'macro_f1', '.4f')} | {_mean(runs, 'worst_recall', '.4f')} | "
            f"{_mean(runs, 'upload_bytes', ',.0f')} | {_mean(runs, 'max_epsilon', '.2f')} | "
            f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f} min |")
    return "\n".join(lines)


def _mean(runs: list[dict[str, Any]], key: str, spec: str) -> str:
    values = [r[key] for r in runs if r[key] is not None]
    if not values:
        return "–"
    text = format(statistics.mean(values), spec)
    if len(values) > 1:
        text += f" ± {format(statistics.stdev(values), spec)}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(PROJECT_ROOT.parent / "shared/data/sst2"))
    parser.add_argument("--test-split", default="dev",
                        help="split to report on (default: dev; sms_spam has only 'test')")
    parser.add_argument("--rows", default="a,b,c,d", help="comma-separated rows of a..e")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row (default 1)")
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--model", help="model override (default: the preset's)")
    parser.add_argument("--rounds", type=int, help="num-server-rounds override")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every row (repeatable, TOML values)")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "outputs" / "utility")
    args = parser.parse_args(argv)
    base = preset_run_config(args.dataset, args.train_examples, args.test_split, args.set)
    if args.model:
        base["model"] = args.model
    if args.rounds:
        base["num-server-rounds"] = args.rounds
    results = []
    results_file = args.output_dir / f"utility-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r}; choose from {', '.join(ROWS)}")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            result = run_row(row, base, args.sites, seed, args.output_dir)
            results.append(result)
            with results_file.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            print(f"row {row} seed {seed}: accuracy {result['accuracy']:.4f}, "
                  f"macro-F1 {result['macro_f1']:.4f}, {result['wall_s'] / 60:.1f} min",
                  flush=True)
    print(f"\n{Path(args.dataset).name}, {args.train_examples} training examples, "
          f"{args.sites} sites, {time.strftime('%Y-%m-%d')}, {platform.node()} "
          f"({platform.processor() or platform.machine()})\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
