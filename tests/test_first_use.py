"""What a newcomer meets first: a server folder with only a test split, a dataset whose
text column has another name, a bare dataset name offline, readable run outputs."""

from __future__ import annotations

import json

import pytest

from sepal.config import RunConfig
from sepal.data import DataError
from sepal.task import run_label_names, run_train_size
from server.run_output import RunOutput, run_summary
from simulations.run import check_experiment
from tests.conftest import SST2


def _csv(folder, name, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(header + "\n" + "".join(f"{r}\n" for r in rows), encoding="utf-8")


def test_a_server_folder_with_only_a_test_split_gives_the_label_names(tmp_path):
    folder = tmp_path / "server-test-set"
    _csv(folder, "test.csv", "text,label", ["good film,1", "bad film,0", "a question,2"])
    cfg = RunConfig(dataset=str(folder))
    assert run_label_names(cfg) == ["0", "1", "2"]
    assert run_train_size(cfg) is None  # each site checks DP settings on its own data

    (folder / "label_names.json").write_text(json.dumps(["neg", "pos", "other"]))
    assert run_label_names(cfg) == ["neg", "pos", "other"]


def test_the_label_names_file_wins_over_the_test_split(tmp_path):
    folder = tmp_path / "data"
    _csv(folder, "test.csv", "text,label", ["only class zero here,0"])
    _csv(folder, "train.csv", "text,label", ["a,0", "b,1", "c,2"])
    (folder / "label_names.json").write_text(json.dumps(["a", "b", "c"]))
    cfg = RunConfig(dataset=str(folder))
    assert run_label_names(cfg) == ["a", "b", "c"]
    assert run_train_size(cfg) == 3


def test_a_dataset_with_a_sentence_column_is_accepted_before_the_run_starts(tmp_path):
    folder = tmp_path / "sentences"
    for split in ("train", "test"):
        _csv(folder, f"{split}.csv", "sentence,category", ["fine,1", "poor,0"])
    check_experiment({"dataset": str(folder), "text-column": "sentence",
                      "label-column": "category"})
    with pytest.raises(DataError, match="column 'text' missing"):
        check_experiment({"dataset": str(folder)})


def test_a_bare_dataset_name_offline_is_refused_before_the_run_starts(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="'dataset' 'trec' is not a folder.*HF_HUB_OFFLINE=0"):
        check_experiment({"dataset": "trec"})


def test_the_default_experiment_passes_the_checks():
    check_experiment({"dataset": str(SST2), "test-split": "dev", "model": "tiny-bert"})


def _record(round_, nodes, accuracy, **extra):
    return {"round": round_, "accuracy": accuracy, "macro_f1": accuracy - 0.1, "loss": 0.5,
            "bytes_up_per_client": {n: 100 for n in nodes},
            "bytes_down_per_client": {n: 200 for n in nodes}, "elapsed_s": 3.0 * round_,
            **extra}


def test_tensorboard_and_summary_name_sites_not_node_ids(tmp_path):
    output = RunOutput(tmp_path / "run", {"model": "tiny-bert"})
    output.record_round({"round": 0, "accuracy": 0.5, "macro_f1": 0.4, "loss": 0.7})
    output.record_round(_record(1, ["9123456789", "42"], 0.7,
                                epsilon_per_client={"42": 1.0, "9123456789": 2.0},
                                delta_per_client={"42": 1e-5, "9123456789": 1e-5}))
    output.record_round(_record(2, ["9123456789", "42"], 0.6,
                                epsilon_per_client={"42": 1.5, "9123456789": 2.5},
                                delta_per_client={"42": 1e-5, "9123456789": 1e-5},
                                per_class={"neg": {"recall": 0.5}}, worst_class_recall=0.5))
    assert output.sites == {"42": "site-1", "9123456789": "site-2"}
    summary = output.write_summary(12.5, checkpoint_folder=None)
    output.close()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert summary["final"] == {"round": 2, "accuracy": 0.6, "macro_f1": 0.5, "loss": 0.5}
    assert summary["best_accuracy"] == {"round": 1, "value": 0.7}
    assert summary["best_macro_f1"]["round"] == 1
    assert summary["per_class"] == {"neg": {"recall": 0.5}} and summary["worst_class_recall"] == 0.5
    assert summary["bytes_up_total"] == 400 and summary["bytes_down_total"] == 800
    assert summary["privacy"] == {"per_site": {"site-1": {"epsilon": 1.5, "delta": 1e-5},
                                               "site-2": {"epsilon": 2.5, "delta": 1e-5}}}
    assert summary["sites"] == {"site-1": 42, "site-2": 9123456789}
    assert summary["wall_time_s"] == 12.5 and summary["elapsed_s"] == 6.0
    assert "checkpoints" not in summary["paths"] and summary["checkpoint_bytes"] == 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epsilon_per_client/site-1", "epsilon_per_client/site-2",
            "bytes_up_per_client/site-1"} <= tags
    assert not [tag for tag in tags if "42" in tag or "9123456789" in tag]


def test_summary_of_a_run_with_user_level_dp():
    rounds = [_record(1, ["7"], 0.6, user_level_epsilon=0.8, user_level_delta=1e-5)]
    summary = run_summary(rounds, {"7": "site-1"}, 1.0, {})
    assert summary["privacy"] == {"user_level": {"epsilon": 0.8, "delta": 1e-5}}
