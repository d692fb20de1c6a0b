"""LoRA fine-tuning (peft): only the adapters and the classifier head are trained and
exchanged.

``exchanged_parameters`` (sepal.model) is "the trainable parameters", so once the model is
wrapped here the server, every client, the evaluator and the exported model agree on what
travels. Export merges the adapters into the base weights so that plain transformers
loads the saved folder.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sepal.config import parse_section, require

if TYPE_CHECKING:  # the section is read where torch is not imported (secure aggregation)
    import torch
    from transformers import PreTrainedModel


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    lora: bool = dataclasses.field(default=False, metadata={
        "help": "Train and exchange LoRA adapters and the classifier head instead of every "
                "weight."})
    lora_r: int = dataclasses.field(default=8, metadata={
        "help": "Rank of the LoRA adapters."})
    lora_alpha: float = dataclasses.field(default=16.0, metadata={
        "help": "LoRA scaling numerator (the update is scaled by alpha / r)."})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "Dropout on the adapters' input, in [0, 1)."})
    lora_target_modules: str = dataclasses.field(default="query,value", metadata={
        "help": "Comma-separated names of the modules that get adapters, e.g. `query,value`."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LoraConfig:
        return parse_section(cls, values)

    @property
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def validate(self) -> None:
        require(self.lora_r >= 1, "lora-r", f"must be >= 1, got {self.lora_r}")
        require(self.lora_alpha > 0, "lora-alpha", f"must be > 0, got {self.lora_alpha}")
        require(0 <= self.lora_dropout < 1, "lora-dropout",
                f"must be in [0, 1), got {self.lora_dropout}")
        require(bool(self.target_modules), "lora-target-modules",
                "must name at least one module, e.g. 'query,value'")

    def apply(self, model: PreTrainedModel) -> torch.nn.Module:
        """``model`` with LoRA adapters on the target modules (unchanged when LoRA is off)."""
        if not self.lora:
            return model
        import peft

        names = [name for name, _ in model.named_modules()]
        missing = [target for target in self.target_modules  # matched as peft does
                   if not any(n == target or n.endswith("." + target) for n in names)]
        require(not missing, "lora-target-modules",
                f"names modules {missing} that model {type(model).__name__} does not have")
        config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=self.lora_r,
                                 lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                 target_modules=self.target_modules)
        return peft.get_peft_model(model, config)


def exportable(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model: a copy with the LoRA adapters merged into the base
    weights (``model`` itself when it has none)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model
