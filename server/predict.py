"""Classify texts with a saved Sepal model: ``sepal-predict --model DIR [TEXT ...]``.

Texts come from the arguments or, when none are given, one per line on stdin.
Prints one JSON object per text: the text, the predicted label and its probability.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sepal.model  # noqa: F401  (registers the mean-pooling classifier with transformers)
from sepal.cli import version_text


def predict(model_dir: str, texts: list[str], max_seq_length: int = 128) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = tokenizer(texts, truncation=True, max_length=max_seq_length, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**encoded).logits.softmax(-1)
    results = []
    for text, row in zip(texts, probabilities):
        label = int(row.argmax())
        results.append({"text": text, "label": model.config.id2label[label],
                        "label_id": label, "probability": round(float(row[label]), 4)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sepal-predict",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--model", required=True, help="folder written by a run (…/model)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("texts", nargs="*", help="texts to classify (default: stdin lines)")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        parser.error("no texts given (as arguments or on stdin)")
    for result in predict(args.model, texts, args.max_seq_length):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
