"""Checkpoints after every completed round, and resuming a run from the last good one.

Flower has no built-in checkpointing, so the ServerApp writes its own: one file per
round, ``<checkpoint-dir or output-dir>/<run-name>/checkpoints/round-NNNN.ckpt``,
holding the global model, the round number, the strategy's state
(``strategies/state.py``: FedAvgM momentum, FedAdam/FedYogi/FedAdagrad moments, DP
clipping norm and accountant), the server's RNG states, the metrics so far, the
update validator's offence counts and the run config it was written under.

A run is identified by its ``run-name``: ``resume = true`` with the same run name
(and the same settings, bar the few in ``MAY_CHANGE_ON_RESUME``) continues from the
newest intact checkpoint.

File layout, so that a torn or truncated file is detected rather than half-read::

    b"SEPALCK1" | payload length (8 bytes, big-endian) | SHA-256 of payload | payload

The payload is a safetensors buffer: every array (the model, strategy moments, RNG
state vectors) is a tensor, and its ``__metadata__`` holds ``state``, a JSON
description of everything else that refers to those tensors by name (safetensors has
no checksum, hence the SHA-256 around it). Nothing is ever unpickled. A file is
written to a temporary name, fsynced, then renamed over the final name
(``os.replace`` is atomic), so a crash leaves either the old file or the new one,
never a mix.

Checkpoints are server-private: besides the un-noised strategy state they hold the
server's RNG state, from which central-DP noise drawn with it could be recomputed. So
they are written 0600 in a 0700 folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from safetensors import SafetensorError

from sepal.checkpoint_config import CheckpointConfig
from sepal.config import RunConfig, require
from sepal.privacy.ledger import PrivacyLedger

log = logging.getLogger("sepal.server")

MAGIC = b"SEPALCK1"
PRIVATE_FILE = 0o600    # checkpoints hold the server's RNG state: owner only
PRIVATE_FOLDER = 0o700
FORMAT_VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 32
NAME = re.compile(r"^round-(\d{4,})\.ckpt$")
# Settings a resumed run may change: they do not alter what the rounds compute.
MAY_CHANGE_ON_RESUME = frozenset({"resume", "num-server-rounds", "round-timeout", "output-dir",
                                  "checkpoint-dir", "checkpoint-keep", "device"})


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, missing or belongs to a different run."""


@dataclasses.dataclass
class Checkpoint:
    round: int
    weights: OrderedDict[str, np.ndarray]
    strategy: list[dict[str, Any]]
    rng: dict[str, Any]
    metrics: list[dict[str, Any]]
    validator: dict[str, Any]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # stamped by Checkpointer


class Checkpointer:
    """Writes a run's checkpoints, keeps the newest ``keep``, finds the newest intact one."""

    def __init__(self, folder: Path, keep: int, run_config: Mapping[str, Any]):
        self.folder = folder
        self.keep = keep
        self.run_config = dict(run_config)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(PRIVATE_FOLDER)
        for stale in self.folder.glob(".round-*.tmp-*"):  # left by a crash mid-write
            stale.unlink()

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.ckpt"

    def save(self, checkpoint: Checkpoint) -> Path:
        checkpoint.config = self.run_config
        path = self.path(checkpoint.round)
        write_checkpoint(path, checkpoint)
        for old in self.existing()[self.keep:]:
            old.unlink()
        return path

    def latest(self) -> Checkpoint | None:
        """The newest intact checkpoint (damaged ones are skipped with a warning); None if
        the run has none yet. Raises CheckpointError when all of them are damaged."""
        damaged = []
        for path in self.existing():
            try:
                checkpoint = read_checkpoint(path)
            except CheckpointError as err:
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one",
                            path, err)
                damaged.append(f"{path.name}: {err}")
                continue
            self._check_same_run(checkpoint.config, path)
            log.info("resuming from %s (round %d complete)", path, checkpoint.round)
            return checkpoint
        if damaged:
            raise CheckpointError(f"every checkpoint in {self.folder} is damaged "
                                  f"({'; '.join(damaged)}); remove them to start the run over")
        return None

    def existing(self) -> list[Path]:
        """Checkpoint files, newest round first."""
        found = [(int(m.group(1)), p) for p in self.folder.iterdir()
                 if (m := NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def _check_same_run(self, saved: Mapping[str, Any], path: Path) -> None:
        for key in sorted(set(saved) | set(self.run_config)):
            if key in MAY_CHANGE_ON_RESUME:
                continue
            before, now = saved.get(key, "<unset>"), self.run_config.get(key, "<unset>")
            if before != now:
                raise CheckpointError(
                    f"run config '{key}' is {now!r} but was {before!r} when {path} was "
                    "written; a resumed run must compute the same rounds (use a new run-name "
                    "to start a different run)")


def open_checkpoints(settings: CheckpointConfig, cfg: RunConfig, run_name: str,
                     run_config: Mapping[str, Any]) -> tuple[Checkpointer | None, Checkpoint | None]:
    """The run's Checkpointer (None when checkpoints are off) and, when resuming, the
    checkpoint to continue from (None when the run has not completed a round yet)."""
    require(bool(cfg.run_name) or not settings.resume, "resume",
            "needs 'run-name': the name of the run to continue")
    if settings.checkpoint_keep == 0:
        return None, None
    checkpoints = Checkpointer(settings.folder(cfg.output_dir, run_name),
                               settings.checkpoint_keep, run_config)
    if settings.resume:
        checkpoint = checkpoints.latest()
        if checkpoint is None:
            log.warning("resume: run '%s' has no checkpoint in %s yet; starting at round 1",
                        run_name, checkpoints.folder)
        return checkpoints, checkpoint
    if checkpoints.existing():
        raise CheckpointError(
            f"run '{run_name}' already has checkpoints in {checkpoints.folder}: set "
            "resume = true to continue it, or choose another run-name")
    return checkpoints, None


def privacy_ledger(run_name: str, settings: CheckpointConfig,
                   resume_from: Checkpoint | None) -> PrivacyLedger:
    """How clients know this run: its name (which keys the noise multiplier and noisy
    count a site keeps for it; ε goes to the site's lifetime ledger whatever the name) and,
    with ``resume``, the first round this run trains. That is round 1 when there is no
    checkpoint yet: a run killed during round 1 may already have trained some sites."""
    if not settings.resume:
        return PrivacyLedger(run_name)
    return PrivacyLedger(run_name, resume_from.round + 1 if resume_from is not None else 1)


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    payload = _serialize(checkpoint)
    header = MAGIC + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    os.fchmod(descriptor, PRIVATE_FILE)  # O_CREAT's mode does not apply to an existing file
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(header)
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def read_checkpoint(path: Path) -> Checkpoint:
    data = path.read_bytes()
    if len(data) < HEADER_BYTES:
        raise CheckpointError(f"truncated: {len(data)} bytes, shorter than the header")
    if data[:len(MAGIC)] != MAGIC:
        raise CheckpointError("not a Sepal checkpoint (bad magic bytes)")
    length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "big")
    digest = data[len(MAGIC) + 8:HEADER_BYTES]
    payload = data[HEADER_BYTES:]
    if len(payload) != length:
        raise CheckpointError(f"truncated: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError("checksum mismatch: the file is corrupted")
    checkpoint = _deserialize(payload)
    if NAME.match(path.name) and int(NAME.match(path.name).group(1)) != checkpoint.round:
        raise CheckpointError(f"holds round {checkpoint.round}, not the round in its name")
    return checkpoint


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state().numpy(),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.from_numpy(np.array(state["torch"], dtype=np.uint8)))


def _serialize(checkpoint: Checkpoint) -> bytes:
    arrays: list[np.ndarray] = []
    fields = {f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(checkpoint)}
    state = _pack(fields, arrays)
    try:
        return safetensors.numpy.save(
            {f"a{i}": np.ascontiguousarray(array) for i, array in enumerate(arrays)},
            metadata={"format": str(FORMAT_VERSION), "state": json.dumps(state)})
    except SafetensorError as err:
        raise CheckpointError(f"cannot save the checkpoint's arrays: {err}") from err


def _deserialize(payload: bytes) -> Checkpoint:
    try:
        arrays = {name: array.copy() for name, array in safetensors.numpy.load(payload).items()}
        metadata = _safetensors_metadata(payload)
        if metadata.get("format") != str(FORMAT_VERSION):
            raise CheckpointError("written by an incompatible version of Sepal")
        state = json.loads(metadata["state"])
    except (SafetensorError, ValueError, KeyError) as err:
        raise CheckpointError(f"unreadable payload: {err}") from err
    values = _unpack(state, arrays)
    values["weights"] = OrderedDict(values["weights"])
    return Checkpoint(**values)


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer, which ``safetensors.numpy.load`` does
    not return: the buffer starts with the header's length (8 bytes, little-endian),
    then the header, a JSON object."""
    length = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + length]).get("__metadata__") or {}


def _pack(value: Any, arrays: list[np.ndarray]) -> Any:
    """JSON-able tree; arrays go to ``arrays`` (referenced by tensor name), tuples and dicts
    are tagged so that they come back as tuples and (ordered, any-key) dicts."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError("cannot save an object array (it would need pickle)")
        arrays.append(value)
        return {"$array": f"a{len(arrays) - 1}"}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"$tuple": [_pack(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_pack(v, arrays) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[key, _pack(v, arrays)] for key, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot save a value of type {type(value).__name__}")


def _unpack(value: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_unpack(v, arrays) for v in value]
    if isinstance(value, dict):
        if "$array" in value:
            return arrays[value["$array"]]
        if "$tuple" in value:
            return tuple(_unpack(v, arrays) for v in value["$tuple"])
        return {key: _unpack(v, arrays) for key, v in value["$dict"]}
    return value
