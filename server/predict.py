"""Classify texts with a saved Sepal model: ``sepal-predict --model DIR [TEXT ...]``.

Texts come from the arguments or, when none are given, one per line on stdin, read and
classified ``BATCH_SIZE`` lines at a time.
Prints one JSON object per text: the text, the predicted label and its probability.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from sepal.cli import version_text
from sepal.model import ModelError, load_tokenizer  # also registers the mean-pooling class


BATCH_SIZE = 64


class PredictError(ValueError):
    """The model folder or an option cannot be used."""


def load(model_dir: str, max_seq_length: int):
    """Tokenizer and model of a saved run; PredictError naming the folder or the option."""
    folder = Path(model_dir).expanduser()
    if not (folder / "config.json").is_file():
        raise PredictError(f"--model {model_dir}: no saved model there (expected the 'model' "
                           "folder of a run, with config.json)")
    try:
        tokenizer = load_tokenizer(str(folder))
    except ModelError as err:
        raise PredictError(f"--model {model_dir}: {err}") from err
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    longest = int(getattr(model.config, "max_position_embeddings", 512))
    if not 1 <= max_seq_length <= longest:
        raise PredictError(f"--max-seq-length {max_seq_length} must be in [1, {longest}] "
                           f"(the model's position embeddings)")
    return tokenizer, model


def predict(model_dir: str, texts: list[str], max_seq_length: int = 128) -> list[dict]:
    tokenizer, model = load(model_dir, max_seq_length)
    return [result for start in range(0, len(texts), BATCH_SIZE)
            for result in _classify(tokenizer, model, texts[start:start + BATCH_SIZE],
                                    max_seq_length)]


def _classify(tokenizer, model, texts: list[str], max_seq_length: int) -> list[dict]:
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


def _batches(lines, size: int):
    batch = []
    for line in lines:
        if line.strip():
            batch.append(line.rstrip("\n"))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sepal-predict",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--model", required=True, help="folder written by a run (…/model)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("texts", nargs="*", help="texts to classify (default: stdin lines)")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    try:
        tokenizer, model = load(args.model, args.max_seq_length)
    except PredictError as err:
        parser.error(str(err))
    printed = 0
    for batch in _batches(args.texts or sys.stdin, BATCH_SIZE):  # stdin: a batch at a time
        for result in _classify(tokenizer, model, batch, args.max_seq_length):
            print(json.dumps(result))
            printed += 1
    if not printed:
        parser.error("no texts given (as arguments or on stdin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
