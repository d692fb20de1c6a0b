"""The run-config section of the server's checkpoints (``server/checkpoint.py``): how many
are kept, where, and whether a run continues from its newest one."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sepal.config import parse_section, require


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    checkpoint_keep: int = dataclasses.field(default=1, metadata={
        "help": "Newest checkpoints kept, each holding what a resume needs (0 writes none; 2 keeps "
                "a fallback should the newest be damaged)."})
    checkpoint_dir: str = dataclasses.field(default="", metadata={
        "help": "Parent folder of `<run-name>/checkpoints/` (empty = `output-dir`)."})
    resume: bool = dataclasses.field(default=False, metadata={
        "help": "Continue the run named `run-name` from its newest intact checkpoint."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CheckpointConfig:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(self.checkpoint_keep >= 0, "checkpoint-keep", "must be >= 0 (0 = no checkpoints)")
        require(not self.resume or self.checkpoint_keep > 0, "resume",
                "needs checkpoints: set checkpoint-keep >= 1 (2 keeps a fallback)")

    def folder(self, output_dir: str, run_name: str) -> Path:
        return Path(self.checkpoint_dir or output_dir) / run_name / "checkpoints"
