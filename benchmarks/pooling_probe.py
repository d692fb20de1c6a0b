"""Which sentence representation of a checkpoint carries the task: a linear probe.

    python -m benchmarks.pooling_probe [--model minilm] [--train-examples 2000]
                                       [--l2 1e-4 1e-3 1e-2]

Encodes the first ``--train-examples`` SST-2 training phrases and the 872-sentence dev
set with the frozen encoder, once with each pooling Sepal offers (``cls``: BERT's pooler
on [CLS]; ``mean``: attention-masked mean of the last hidden states), fits a logistic
regression on each (full-batch L-BFGS, each L2 weight in turn) and prints dev accuracy.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sepal.data import load_split
from sepal.model import build_model, load_tokenizer
from simulations.run import PROJECT_ROOT

SST2 = (PROJECT_ROOT.parent / "shared" / "data" / "sst2").resolve()


@torch.no_grad()
def encode(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """What the classifier reads: its input, captured by a forward hook."""
    features = []
    hook = model.classifier.register_forward_hook(
        lambda _module, inputs, _output: features.append(inputs[0]))
    for start in range(0, len(texts), 128):
        model(**tokenizer(texts[start:start + 128], truncation=True, max_length=64,
                          padding=True, return_tensors="pt"))
    hook.remove()
    return torch.cat(features)


def probe(train_x, train_y, dev_x, dev_y, l2: float) -> float:
    head = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(head(train_x), train_y)
                + l2 * head.weight.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((head(dev_x).argmax(-1) == dev_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    args = parser.parse_args(argv)
    train = load_split(str(SST2), "train").head(args.train_examples, 42)
    dev = load_split(str(SST2), "dev")
    tokenizer = load_tokenizer(args.model)
    print(f"\n{args.model}, linear probe on {len(train)} SST-2 training phrases, dev (872)\n")
    print("| pooling | " + " | ".join(f"L2 {l2:g}" for l2 in args.l2) + " |")
    print("|---|" + "---|" * len(args.l2))
    for pooling in ("cls", "mean"):
        model = build_model(args.model, train.label_names, 0, pooling=pooling).eval()
        train_x, dev_x = encode(model, tokenizer, train.texts), encode(model, tokenizer, dev.texts)
        train_y, dev_y = torch.as_tensor(train.labels), torch.as_tensor(dev.labels)
        scores = [probe(train_x, train_y, dev_x, dev_y, l2) for l2 in args.l2]
        print(f"| {pooling} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
