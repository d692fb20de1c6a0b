"""Which local optimizer settings learn under DP-SGD: a one-site sweep.

    python -m benchmarks.dp_optimizers [--examples 1000] [--rounds 3] [--settings NAME,...]

One site holds ``--examples`` SST-2 training phrases and trains MiniLM for ``--rounds``
passes (one pass = one federated round of one local epoch) under DP-SGD at ε = 8,
δ = 1e-5, logical batch 128 in physical chunks of 32, the noise calibrated once for all
passes, with the product's own path (``ClientPrivacy.attach`` + ``train_epochs`` and the
run-wide linear schedule). Prints dev accuracy after every pass for each setting.
"""

from __future__ import annotations

import argparse
import platform
import time

from sepal.data import make_loader
from sepal.model import resolve_device
from sepal.optim import LearningRateSchedule, build_optimizer
from sepal.privacy.config import EffectivePrivacy, SitePolicy
from sepal.privacy.engine import ClientPrivacy, LocalPlan
from sepal.settings import Settings
from sepal.task import (
    NodeData,
    build_task_model,
    tokenized_node_split,
    tokenized_server_test_split,
)
from sepal.training import evaluate, seed_everything, train_epochs
from simulations.run import PROJECT_ROOT

# name -> run-config settings on top of LoRA (r 8, query/value), AdamW, DP-SGD at ε = 8
SETTINGS: dict[str, dict] = {
    "lora-adamw-5e-4-head-5e-3": {"learning-rate": 5e-4, "head-learning-rate": 5e-3},
    "lora-sgd-0.1": {"optimizer": "sgd", "learning-rate": 0.1},
    "head-adamw-5e-2": {"trainable": "head", "lora": False, "learning-rate": 5e-2},
    "lora-adamw-2e-3-head-5e-2": {"learning-rate": 2e-3, "head-learning-rate": 5e-2},
    "lora-adamw-5e-4-head-5e-2": {"learning-rate": 5e-4, "head-learning-rate": 5e-2},
    "lora-adamw-1e-3-head-5e-2": {"learning-rate": 1e-3, "head-learning-rate": 5e-2},
    "lora-adamw-1e-3-head-5e-2-split-clip-0.25": {
        "learning-rate": 1e-3, "head-learning-rate": 5e-2, "dp-head-clip-share": 0.25},
    "lora-adamw-5e-4-head-5e-3-no-dp": {"learning-rate": 5e-4, "head-learning-rate": 5e-3,
                                        "dp-sgd": False, "batch-size": 32},
}


def sweep_one(name: str, examples: int, rounds: int, dataset: str,
              model_name: str = "minilm") -> list[float]:
    settings = {"model": model_name, "dataset": dataset, "test-split": "dev", "lora": True,
                "max-train-examples": examples, "num-server-rounds": rounds,
                "lr-schedule": "linear", "batch-size": 128, "physical-batch-size": 32,
                "dp-sgd": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5,
                "dp-max-grad-norm": 1.0, **SETTINGS[name]}
    parsed = Settings.from_mapping(settings)
    cfg, run_dp = parsed.run, parsed.dp
    device = resolve_device("auto")
    seed_everything(cfg.seed)
    data = tokenized_node_split(cfg, NodeData(partition_id=0, num_partitions=1), "train")
    test = make_loader(tokenized_server_test_split(cfg), 256, False, cfg.seed)
    labels = ["negative", "positive"]
    model = build_task_model(cfg, labels, parsed.lora).to(device)
    optimizer_ = build_optimizer(model, cfg)
    steps_per_round = -(-len(data) // cfg.batch_size)
    stepper = LearningRateSchedule("linear", rounds * steps_per_round).attach(optimizer_)
    privacy = None
    if run_dp.dp_sgd:
        policy = EffectivePrivacy.combine(run_dp, SitePolicy())
        privacy = ClientPrivacy.calibrated(policy, LocalPlan(len(data), cfg.batch_size, 1, rounds))
    accuracies = []
    for server_round in range(1, rounds + 1):
        loader = make_loader(data, cfg.batch_size, True, cfg.seed + server_round)
        if privacy is None:
            train_epochs(model, loader, optimizer_, 1, device,
                         physical_batch_size=cfg.physical_batch_size, schedule=stepper)
        else:
            with privacy.attach(model, optimizer_, loader) as (dp_opt, criterion, dp_loader):
                train_epochs(model, dp_loader, dp_opt, 1, device, criterion=criterion,
                             physical_batch_size=cfg.physical_batch_size, schedule=stepper)
        accuracies.append(evaluate(model, test, device, len(labels)).accuracy)
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default=str(PROJECT_ROOT.parent / "shared/data/sst2"))
    args = parser.parse_args(argv)
    print(f"{args.examples} SST-2 phrases, one site, ε=8, δ=1e-5, {args.rounds} passes, "
          f"{time.strftime('%Y-%m-%d')}, {platform.node()}\n")
    print("| setting | dev accuracy after each pass | wall time |")
    print("|---|---|---|")
    for name in args.settings.split(","):
        started = time.time()
        accuracies = sweep_one(name.strip(), args.examples, args.rounds, args.dataset,
                               args.model)
        print(f"| {name} | {' → '.join(f'{a:.3f}' for a in accuracies)} | "
              f"{time.time() - started:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
