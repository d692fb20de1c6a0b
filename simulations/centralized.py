"""Centralized baseline: the same model on the union of the clients' examples.

Same examples (the run's ``max-train-examples`` subset), same number of passes
(``num-server-rounds x local-epochs``), same optimizer and batch size as the
federation, evaluated on the same test split after every round-equivalent.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from sepal.config import RunConfig
from sepal.data import TokenizedDataset, make_loader
from sepal.lora import LoraConfig, exportable
from sepal.model import load_tokenizer, resolve_device
from sepal.optim import LearningRateSchedule, build_optimizer
from sepal.task import build_task_model, centralized_train_split, tokenized_server_test_split
from sepal.training import evaluate, evaluation_record, seed_everything, train_epochs
from server.run_output import RunOutput


def run_centralized(cfg: RunConfig, folder: Path, lora: LoraConfig | None = None) -> RunOutput:
    output = RunOutput(folder, {**dataclasses.asdict(cfg), "mode": "centralized",
                                **({"lora": dataclasses.asdict(lora)} if lora else {})})
    device = resolve_device(cfg.device)
    train_split = centralized_train_split(cfg)
    model = build_task_model(cfg, train_split.label_names, lora).to(device)
    train_set = TokenizedDataset(train_split, load_tokenizer(cfg.model), cfg.max_seq_length)
    test_loader = make_loader(tokenized_server_test_split(cfg), cfg.batch_size * 4, False, cfg.seed)
    optimizer = build_optimizer(model, cfg)
    steps_per_round = cfg.local_epochs * math.ceil(len(train_set) / cfg.batch_size)
    stepper = LearningRateSchedule(cfg.lr_schedule, cfg.num_server_rounds * steps_per_round
                                   ).attach(optimizer)
    num_labels = len(train_split.label_names)
    started = time.time()
    stats = evaluate(model, test_loader, device, num_labels)
    output.record_round({"round": 0, **evaluation_record(stats, train_split.label_names),
                         "elapsed_s": 0.0})
    for server_round in range(1, cfg.num_server_rounds + 1):
        seed_everything(cfg.seed + server_round)
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
        train = train_epochs(model, loader, optimizer, cfg.local_epochs, device,
                             description=f"centralized {server_round}",
                             physical_batch_size=cfg.physical_batch_size, schedule=stepper)
        stats = evaluate(model, test_loader, device, num_labels)
        output.record_round({
            "round": server_round, **evaluation_record(stats, train_split.label_names),
            "train_loss": train.loss, "examples": train.examples,
            "elapsed_s": round(time.time() - started, 3),
        })
    exportable(model).save_pretrained(str(output.model_path))
    load_tokenizer(cfg.model).save_pretrained(str(output.model_path))
    output.close()
    return output
