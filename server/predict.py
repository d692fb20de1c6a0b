"""Classify texts with a saved Sepal model: ``sepal-predict --model PATH [TEXT ...]``.

``PATH`` is a run folder (its int8 model when exported, else ``model/``) or a model folder.
Texts come from the arguments or, when none are given, one per line on stdin, read and
classified ``--batch-size`` lines at a time. Prints one JSON object per text: the text,
the predicted label, its id and probability, and the probability of every label.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable, Iterator

from sepal.cli import version_text
from sepal.inference import PRECISIONS, Classifier, InferenceError, model_folder


def batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    texts = (line.rstrip("\r\n") for line in lines if line.strip())
    while batch := list(itertools.islice(texts, size)):
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run folder or a model folder")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="for a run folder: int8, fp32, or auto (int8 when exported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("texts", nargs="*", help="texts to classify (default: stdin lines)")
    parser.add_argument("--version", action="version", version=version_text())
    args = parser.parse_args(argv)
    try:
        classifier = Classifier.load(model_folder(args.model, args.precision), args.batch_size)
    except InferenceError as err:
        print(f"sepal-predict: {err}", file=sys.stderr)
        return 2
    seen = 0
    for batch in batches(args.texts or sys.stdin, args.batch_size):
        for text, prediction in zip(batch, classifier.predict(batch)):
            print(json.dumps({"text": text, **prediction.to_dict()}))
        seen += len(batch)
    if not seen:
        parser.error("no texts given (as arguments or on stdin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
