"""DP-SGD cost per training step: DP time / non-DP time and peak memory, MiniLM.

    python -m benchmarks.dp_step_time [--steps 20] [--batch-size 16] [--seq 64] [--threads N]

Four configurations, each in its own process (so that peak RSS is its own): full
fine-tuning without DP and with Opacus ghost clipping; LoRA (r=8 on query,value) without
DP and with Opacus hooks (the modes Sepal picks by default). Every configuration runs the
product's own path (``ClientPrivacy.attach`` + ``train_epochs``) on real SST-2 sentences;
DP batches are Poisson-sampled with the same expected size. The "noise draw" column times
one Gaussian draw shaped like the trainable parameters, as Opacus' optimizer makes every
step: a floor under the DP / non-DP ratio that no clipping method removes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

CONFIGS = {
    "full": (False, False),
    "full-dp-ghost": (False, True),
    "lora": (True, False),
    "lora-dp-hooks": (True, True),
}
SST2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2")


def measure(name: str, steps: int, batch_size: int, seq: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from sepal.config import RunConfig
    from sepal.data import make_loader
    from sepal.lora import LoraConfig
    from sepal.model import build_model
    from sepal.privacy import DPSGDConfig, EffectivePrivacy, SitePolicy
    from sepal.privacy.engine import ClientPrivacy, LocalPlan
    from sepal.task import NodeData, tokenized_node_split
    from sepal.training import train_epochs

    lora, private = CONFIGS[name]
    cfg = RunConfig(model="minilm", dataset=os.path.abspath(SST2), max_seq_length=seq,
                    max_train_examples=steps * batch_size, batch_size=batch_size)
    node = NodeData(partition_id=0, num_partitions=1)
    dataset = tokenized_node_split(cfg, node, "train")
    model = LoraConfig(lora=lora).apply(build_model("minilm", ["negative", "positive"], 0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    policy = EffectivePrivacy.combine(DPSGDConfig(dp_sgd=True), SitePolicy(), len(dataset))
    privacy = ClientPrivacy(policy, LocalPlan(len(dataset), batch_size, 1, 1), 1.0)
    warmup = torch.utils.data.Subset(dataset, range(2 * batch_size))
    device = torch.device("cpu")
    timings = []
    for data in (warmup, dataset):  # the first pass only warms up
        loader = make_loader(data, batch_size, shuffle=True, seed=0)
        if private:
            privacy.plan = LocalPlan(len(data), batch_size, 1, 1)
        attached = (privacy.attach(model, optimizer, loader) if private
                   else nullcontext((optimizer, None, loader)))
        with attached as (opt, criterion, batches):
            start = time.perf_counter()
            stats = train_epochs(model, batches, opt, 1, device, criterion=criterion)
            timings.append((time.perf_counter() - start, stats.steps, stats.examples))
    seconds, taken, examples = timings[-1]
    return {
        "noise_s_per_step": noise_draw_seconds(model) if private else 0.0,
        "config": name, "mode": privacy.grad_sample_mode(model) if private else "-",
        "trainable": trainable, "steps": taken, "examples": examples,
        "s_per_step": seconds / taken,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "threads": torch.get_num_threads(),
    }


def noise_draw_seconds(model, repeats: int = 5) -> float:
    import torch

    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(repeats):
        for shape in shapes:
            torch.normal(0.0, 1.0, shape, generator=generator)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config:
        print(json.dumps(measure(args.config, args.steps, args.batch_size, args.seq,
                                 args.threads)))
        return 0
    rows = {}
    for name in CONFIGS:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.dp_step_time", "--config", name,
             "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--seq", str(args.seq), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows[name] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"measured {name}: {rows[name]}", file=sys.stderr)
    print(f"\nMiniLM (all-MiniLM-L6-v2), batch {args.batch_size}, seq <= {args.seq}, "
          f"{args.steps} timed steps, {rows['full']['threads']} torch threads, CPU\n")
    print("| configuration | trainable params | Opacus mode | s/step | DP / non-DP | "
          "noise draw s/step | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        base = rows[name.split("-dp")[0]]
        ratio = row["s_per_step"] / base["s_per_step"]
        print(f"| {name} | {row['trainable']:,} | {row['mode']} | {row['s_per_step']:.3f} | "
              f"{ratio:.2f}x | {row['noise_s_per_step'] or '-':.3} | "
              f"{row['peak_rss_gb']:.2f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
