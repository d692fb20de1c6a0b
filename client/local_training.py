"""One round of local fine-tuning on a node."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from client.proximal import proximal_step
from sepal.config import RunConfig
from sepal.data import DataError, check_site_label_names, make_loader
from sepal.lora import LoraConfig
from sepal.model import get_weights, set_weights
from sepal.optim import LearningRateSchedule, build_optimizer
from sepal.privacy.engine import ClientPrivacy
from sepal.task import NodeData, build_task_model, tokenized_node_split
from sepal.training import TrainStats, seed_everything, train_epochs


@dataclasses.dataclass
class LocalStats(TrainStats):
    examples_in_split: int = 0


class LocalTraining:
    """Owns the node's model for one message: load global weights, train, read back."""

    def __init__(self, cfg: RunConfig, node: NodeData, label_names: list[str],
                 device: torch.device, lora: LoraConfig | None = None):
        self.cfg = cfg
        self.node = node
        self.label_names = label_names
        self.device = device
        if node.data_path:
            check_site_label_names(Path(node.data_path).expanduser(), label_names)
        self.model = build_task_model(cfg, label_names, lora).to(device)

    def load(self, weights: OrderedDict[str, np.ndarray]) -> None:
        set_weights(self.model, weights)

    def run(self, global_weights: OrderedDict[str, np.ndarray], server_round: int,
            privacy: ClientPrivacy | None = None, proximal_mu: float = 0.0) -> LocalStats:
        self.load(global_weights)
        dataset = tokenized_node_split(self.cfg, self.node, self.cfg.train_split)
        max_label = int(dataset.labels.max())
        if max_label >= len(self.label_names):
            raise DataError(
                f"this node's '{self.cfg.train_split}' split has label {max_label}, but the "
                f"federation has {len(self.label_names)} classes {self.label_names}"
            )
        seed = self.cfg.seed * 1_000_003 + server_round * 1_009 + max(self.node.partition_id, 0)
        seed_everything(seed)
        loader = make_loader(dataset, self.cfg.batch_size, shuffle=True, seed=seed)
        optimizer = build_optimizer(self.model, self.cfg)
        steps_per_round = self.cfg.local_epochs * math.ceil(len(dataset) / self.cfg.batch_size)
        schedule = LearningRateSchedule(self.cfg.lr_schedule,
                                        total_steps=self.cfg.num_server_rounds * steps_per_round,
                                        first_step=(server_round - 1) * steps_per_round)
        stepper = schedule.attach(optimizer)
        if proximal_mu > 0:  # FedProx
            optimizer.register_step_post_hook(proximal_step(self.model, global_weights, proximal_mu))
        attached = (privacy.attach(self.model, optimizer, loader) if privacy
                   else nullcontext((optimizer, None, loader)))
        with attached as (optimizer, criterion, loader):
            stats = train_epochs(self.model, loader, optimizer, self.cfg.local_epochs, self.device,
                                 criterion=criterion, description=f"round {server_round}",
                                 physical_batch_size=self.cfg.physical_batch_size,
                                 schedule=stepper)
        return LocalStats(**dataclasses.asdict(stats), examples_in_split=len(dataset))

    def local_weights(self) -> OrderedDict[str, np.ndarray]:
        return get_weights(self.model)
