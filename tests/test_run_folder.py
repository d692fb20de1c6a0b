"""A run folder is never reused by a fresh run, a run name is locked while it runs, and
checkpoints are private to the server's account."""

from __future__ import annotations

import stat
from collections import OrderedDict

import numpy as np
import pytest

from server.checkpoint import Checkpoint, Checkpointer, capture_rng
from server.run_output import RunFolderError, claim_run_folder


def test_a_fresh_run_refuses_a_folder_holding_a_past_run(tmp_path):
    folder = tmp_path / "outputs" / "trial"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"round": 0}\n')
    with pytest.raises(RunFolderError, match="already holds a run.*resume = true"):
        claim_run_folder(folder, resume=False)
    with claim_run_folder(folder, resume=True):  # resuming continues it
        pass
    with claim_run_folder(tmp_path / "outputs" / "empty", resume=False):
        pass


def test_two_runs_of_one_name_are_locked_apart(tmp_path):
    folder = tmp_path / "outputs" / "trial"
    with claim_run_folder(folder, resume=False):
        with pytest.raises(RunFolderError, match="in use by another running run"):
            claim_run_folder(folder, resume=True)
    with claim_run_folder(folder, resume=True):  # released when the first one ended
        pass


def test_checkpoints_are_0600_in_a_0700_folder(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True, mode=0o755)
    checkpoints = Checkpointer(folder, keep=2, run_config={"seed": 1})
    path = checkpoints.save(Checkpoint(
        round=1, weights=OrderedDict(w=np.zeros(3, np.float32)), strategy=[], rng=capture_rng(),
        metrics=[], validator={"offences": {}}))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
