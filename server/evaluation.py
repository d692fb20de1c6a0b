"""Centralized evaluation of the global model on the run's test split."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np

from sepal.config import RunConfig
from sepal.data import make_loader
from sepal.lora import LoraConfig, exportable
from sepal.model import resolve_device, set_weights
from sepal.task import build_task_model, tokenized_server_test_split
from sepal.training import EvalStats, evaluate


class ServerEvaluator:
    def __init__(self, cfg: RunConfig, label_names: list[str], lora: LoraConfig | None = None):
        self.cfg = cfg
        self.label_names = label_names
        self.device = resolve_device(cfg.device)
        self.model = build_task_model(cfg, label_names, lora).to(self.device)
        self.loader = make_loader(tokenized_server_test_split(cfg), cfg.batch_size * 4,
                                  shuffle=False, seed=cfg.seed)

    def __call__(self, weights: OrderedDict[str, np.ndarray]) -> EvalStats:
        set_weights(self.model, weights)
        return evaluate(self.model, self.loader, self.device, len(self.label_names))

    def export(self, weights: OrderedDict[str, np.ndarray], folder) -> None:
        """Save the global model so plain ``transformers`` can load it; the tokenizer's
        ``model_max_length`` is the run's ``max_seq_length``, the length it trained on."""
        from sepal.model import load_tokenizer

        set_weights(self.model, weights)
        exportable(self.model).save_pretrained(str(folder))
        tokenizer = copy.copy(load_tokenizer(self.cfg.model))  # the cached one stays as it is
        tokenizer.model_max_length = self.cfg.max_seq_length
        tokenizer.save_pretrained(str(folder))
