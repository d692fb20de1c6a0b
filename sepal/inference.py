"""Batched inference on an exported model, shared by ``sepal-predict`` and ``sepal-serve``.

A run folder holds the fp32 model in ``model/`` (transformers ``save_pretrained``) and,
once exported for serving, the int8 model in ``model-int8/`` (ONNX Runtime, ``model.onnx``).
Both folders carry the tokenizer and ``config.json``; the tokenizer's ``model_max_length``
is the sequence length the model was trained with, and inputs are truncated to it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

FP32_FOLDER = "model"
INT8_FOLDER = "model-int8"
ONNX_FILE = "model.onnx"
PRECISIONS = ("auto", "int8", "fp32")


class InferenceError(ValueError):
    """The model folder is missing or is not an exported Sepal model."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: str
    label_id: int
    probability: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Backend(Protocol):
    format: str

    def logits(self, encoded: dict[str, np.ndarray]) -> np.ndarray: ...


class TorchBackend:
    """A transformers (or dynamically quantized PyTorch) sequence classifier."""

    def __init__(self, model, format: str = "pytorch-fp32"):
        self.model = model.eval()
        self.format = format

    def logits(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = {name: torch.from_numpy(array) for name, array in encoded.items()}
            return self.model(**inputs).logits.float().numpy()


class OnnxBackend:
    """An ONNX Runtime session on ``model.onnx`` (inputs named as the tokenizer's outputs)."""

    def __init__(self, path: Path, threads: int = 0, format: str = "onnx-int8"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.format = format

    def logits(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: encoded[name].astype(np.int64) for name in self.input_names}
        return self.session.run(["logits"], feed)[0]


class Classifier:
    """Tokenizes, runs the model in micro-batches of ``batch_size`` texts and returns one
    :class:`Prediction` per text, in order. Texts are grouped by length so that a batch
    pads to its own longest text, not the request's."""

    def __init__(self, tokenizer, backend: Backend, label_names: list[str], max_length: int,
                 batch_size: int = 32):
        if batch_size < 1:
            raise InferenceError(f"batch size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.backend = backend
        self.label_names = label_names
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(cls, folder: str | Path, batch_size: int = 32, threads: int = 0) -> Classifier:
        """The model in ``folder``: ``model.onnx`` when present, else the transformers model."""
        folder = Path(folder)
        label_names, position_limit = _read_model_config(folder)
        from transformers import AutoTokenizer

        import sepal.model  # noqa: F401  (registers the mean-pooling config and classifier)

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise InferenceError(f"{folder}: the tokenizer cannot be loaded ({err})") from err
        max_length = min(int(tokenizer.model_max_length), position_limit)
        if (folder / ONNX_FILE).is_file():
            backend: Backend = OnnxBackend(folder / ONNX_FILE, threads)
        else:
            import torch
            from transformers import AutoModelForSequenceClassification

            if threads > 0:
                torch.set_num_threads(threads)
            try:
                model = AutoModelForSequenceClassification.from_pretrained(str(folder))
            except (OSError, ValueError) as err:
                raise InferenceError(f"{folder}: the model cannot be loaded ({err})") from err
            backend = TorchBackend(model)
        return cls(tokenizer, backend, label_names, max_length, batch_size)

    @property
    def format(self) -> str:
        return self.backend.format

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[Prediction | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for index, row in zip(batch, self.probabilities([texts[i] for i in batch])):
                label = int(row.argmax())
                results[index] = Prediction(
                    label=self.label_names[label], label_id=label,
                    probability=round(float(row[label]), 6),
                    probabilities={name: round(float(p), 6)
                                   for name, p in zip(self.label_names, row)})
        return results  # type: ignore[return-value]

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Softmax over the labels for one batch, shape ``(len(texts), labels)``."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="np")
        logits = self.backend.logits(dict(encoded)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def _read_model_config(folder: Path) -> tuple[list[str], int]:
    """Label names (in id order) and the position-embedding limit from ``config.json``."""
    if not folder.is_dir():
        raise InferenceError(f"model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise InferenceError(f"{folder} is not an exported model (no config.json): pass a run "
                             f"folder or its {FP32_FOLDER}/ or {INT8_FOLDER}/ folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
        position_limit = int(config.get("max_position_embeddings", 512))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InferenceError(f"{path}: no readable 'id2label' mapping ({err!r})") from err
    if sorted(id2label) != list(range(len(id2label))) or len(id2label) < 2:
        raise InferenceError(f"{path}: 'id2label' must map 0..N-1 (N >= 2), got {sorted(id2label)}")
    return [id2label[i] for i in range(len(id2label))], position_limit


def model_folder(path: str | Path, precision: str = "auto") -> Path:
    """The model folder to load for ``path``, a model folder or a run folder.

    For a run folder, ``auto`` takes ``model-int8/`` when it was exported, else ``model/``.
    """
    if precision not in PRECISIONS:
        raise InferenceError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    path = Path(path)
    if not path.is_dir():
        raise InferenceError(f"model folder {path} does not exist")
    int8, fp32 = path / INT8_FOLDER, path / FP32_FOLDER
    if not (fp32 / "config.json").is_file():
        return path  # a model folder; Classifier.load says what is missing, if anything
    if precision in ("auto", "int8") and (int8 / ONNX_FILE).is_file():
        return int8
    if precision == "int8":
        raise InferenceError(f"run folder {path} has no int8 model ({int8}/{ONNX_FILE}): "
                             f"write it with 'sepal-export {path}'")
    return fp32


def latest_run(outputs: str | Path) -> Path:
    """The run folder under ``outputs`` whose model was written last."""
    outputs = Path(outputs)
    if not outputs.is_dir():
        raise InferenceError(f"outputs folder {outputs} does not exist: pass --model")
    runs = [config.parent.parent for config in outputs.glob(f"*/{FP32_FOLDER}/config.json")]
    if not runs:
        raise InferenceError(f"no run under {outputs} has a model ({FP32_FOLDER}/config.json)")
    return max(runs, key=lambda run: (run / FP32_FOLDER / "config.json").stat().st_mtime)
