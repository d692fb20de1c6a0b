"""Loading CSV folders, partitioning, and every kind of bad data."""

from __future__ import annotations

import numpy as np
import pytest

from sepal.config import ConfigError, RunConfig
from sepal.data import (
    DataError,
    check_labels_within,
    check_site_label_names,
    check_training_classes,
    collate,
    load_split,
    partition,
)
from sepal.model import ModelError, load_tokenizer
from sepal.task import NodeData


def write_folder(folder, train: bytes, labels: str | None = '["a", "b", "c"]'):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_bytes(train)
    if labels is not None:
        (folder / "label_names.json").write_text(labels)
    return folder


def test_real_sst2_dev_split_loads_with_label_names(sst2):
    split = load_split(str(sst2), "dev")
    assert len(split) == 872
    assert split.label_names == ["negative", "positive"]
    assert set(np.unique(split.labels)) == {0, 1}


def test_multiclass_folder_loads(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\nx,0\ny,2\nz,1\n")
    split = load_split(str(folder), "train")
    assert split.label_names == ["a", "b", "c"]
    assert split.labels.tolist() == [0, 2, 1]


def test_without_label_names_classes_are_inferred(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\nx,0\ny,3\n", labels=None)
    assert load_split(str(folder), "train").label_names == ["0", "1", "2", "3"]


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partitions_keep_every_example_exactly_once(sst2, method):
    split = load_split(str(sst2), "train").head(1000, seed=7)
    shares = [partition(split, 10, i, method, alpha=0.5, seed=7) for i in range(10)]
    texts = [text for share in shares for text in share.texts]
    assert len(texts) == len(split)
    assert sorted(texts) == sorted(split.texts)
    if method == "dirichlet":  # label skew: class shares differ across clients
        positive = [share.labels.mean() for share in shares if len(share) >= 20]
        assert max(positive) - min(positive) > 0.3


def test_head_is_a_fixed_seeded_subset(sst2):
    split = load_split(str(sst2), "train")
    assert split.head(50, seed=1).texts == split.head(50, seed=1).texts
    assert split.head(50, seed=1).texts != split.head(50, seed=2).texts


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"text,label\nfine,0\nbad,7\n", r"train\.csv, row 3: label 7 out of range \[0, 3\)"),
        (b"text,label\nfine,0\nbad,x\n", r"train\.csv, row 3: label 'x' is not an integer"),
        (b"text,label\nfine,0\n,1\n", r"train\.csv, row 3: empty 'text'"),
        (b"text,label\nok,0\nbad \xff\xfe,1\n", r"train\.csv, row 3: bytes are not valid UTF-8"),
        (b"sentence,label\nx,0\n", r"train\.csv: column 'text' missing"),
        (b"text,label\n", r"train\.csv: split 'train' is empty"),
        (b"text,label\nx,-1\n", r"train\.csv, row 2: label -1 out of range"),
        (b"text,label\nfine,0\ngood, really,1\n", r"train\.csv, row 3: more fields than the "
                                                  r"header"),
        (b"text,label\nfine,0\nbad,1_0\n", r"train\.csv, row 3: label '1_0' is not an integer"),
        (b"text,label\nfine,0\nbad,+1\n", r"train\.csv, row 3: label '\+1' is not an integer"),
        ("text,label\nfine,0\nbad,\u0661\n".encode(), r"train\.csv, row 3: label '\u0661' is "
                                                      r"not an integer"),
    ],
)
def test_bad_data_names_the_file_and_row(tmp_path, content, message):
    folder = write_folder(tmp_path / "d", content)
    with pytest.raises(DataError, match=message):
        load_split(str(folder), "train")


def test_missing_split_file_lists_what_is_there(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\nx,0\n")
    with pytest.raises(DataError, match=r"test\.csv: split 'test' not found .*'train\.csv'"):
        load_split(str(folder), "test")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="does-not-exist does not exist"):
        load_split(str(tmp_path / "does-not-exist"), "train")


def test_hub_dataset_offline_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="point 'dataset' .* at a local folder"):
        load_split("some-org/some-dataset-that-is-not-cached", "train")


def test_collate_gives_opacus_ready_per_example_inputs():
    batch = collate([([101, 7, 102], 1), ([101, 102], 0)])
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].shape == (2, 3) and batch["position_ids"].is_contiguous()
    assert batch["token_type_ids"].shape == (2, 3)


def test_bad_run_config_names_the_key():
    with pytest.raises(ConfigError, match="'partitioner' must be 'iid' or 'dirichlet'"):
        RunConfig.from_mapping({"partitioner": "random"})
    with pytest.raises(ConfigError, match="'batch-size' must be an integer"):
        RunConfig.from_mapping({"batch-size": "big"})
    with pytest.raises(ConfigError, match="node config 'data-path' is needed"):
        NodeData.from_mapping({})


def test_huge_labels_without_label_names_are_refused(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\nfine,0\nhuge,1000000000\n", labels=None)
    with pytest.raises(DataError, match=r"train\.csv, row 3: label 1000000000 without "
                                        r"label_names\.json"):
        load_split(str(folder), "train")


def test_a_one_class_training_set_is_refused(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\na,1\nb,1\n")
    with pytest.raises(DataError, match="every example has label 1; a classifier needs at "
                                        "least two classes"):
        check_training_classes(load_split(str(folder), "train"))


def test_a_test_label_outside_the_training_classes_is_named(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\na,0\nb,1\n", labels=None)
    (folder / "test.csv").write_bytes(b"text,label\na,0\nc,2\n")
    train, test = load_split(str(folder), "train"), load_split(str(folder), "test")
    with pytest.raises(DataError, match=r"test\.csv: label 2 of split 'test' is not one of the "
                                        r"2 training classes"):
        check_labels_within(test, train.label_names, "split 'test'")


def test_a_site_listing_the_labels_in_another_order_is_refused(tmp_path):
    folder = write_folder(tmp_path / "d", b"text,label\na,0\n", labels='["pos", "neg"]')
    with pytest.raises(DataError, match=r"label_names\.json lists \['pos', 'neg'\], the "
                                        r"federation's classes are \['neg', 'pos'\]"):
        check_site_label_names(folder, ["neg", "pos"])
    check_site_label_names(folder, ["pos", "neg"])


def test_an_empty_dirichlet_partition_is_a_clear_error(tmp_path):
    rows = b"text,label\n" + b"".join(b"t%d,%d\n" % (i, i % 2) for i in range(40))
    split = load_split(str(write_folder(tmp_path / "d", rows, labels=None)), "train")
    with pytest.raises(DataError, match=r"partition \d+ of 20 \(dirichlet"):
        for partition_id in range(20):
            partition(split, 20, partition_id, "dirichlet", 0.01, seed=0)


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path / "model"))
