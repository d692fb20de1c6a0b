"""Model choices: mean pooling (sentence-transformers checkpoints) and head-only training."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from client.local_training import LocalTraining
from sepal.config import ConfigError, RunConfig
from sepal.lora import LoraConfig
from sepal.model import (
    MeanPoolingBertForSequenceClassification,
    ModelError,
    build_model,
    get_weights,
    resolve_pooling,
)
from sepal.privacy import DPSGDConfig, EffectivePrivacy, SitePolicy
from sepal.privacy.engine import ClientPrivacy, LocalPlan
from sepal.task import NodeData, build_task_model
from server.evaluation import ServerEvaluator
from tests.conftest import TINY_RUN
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

LABELS = ["negative", "positive"]


def test_auto_pooling_follows_the_checkpoints_sentence_transformers_config():
    assert resolve_pooling("minilm", "auto") == "mean"  # 1_Pooling/config.json: mean tokens
    assert resolve_pooling("tiny-bert", "auto") == "cls"
    assert resolve_pooling("minilm", "cls") == "cls"
    with pytest.raises(ModelError, match="pooling must be one of"):
        resolve_pooling("minilm", "max")


def test_mean_pooling_reads_only_the_real_tokens():
    model = build_model("tiny-bert", LABELS, 0, pooling="mean").eval()
    assert isinstance(model, MeanPoolingBertForSequenceClassification)
    assert model.bert.pooler is None and not any("pooler" in n for n, _ in
                                                 model.named_parameters())
    ids = torch.tensor([[101, 2204, 3185, 102]])
    padded = torch.tensor([[101, 2204, 3185, 102, 0, 0, 0]])
    with torch.no_grad():
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        long = model(input_ids=padded, attention_mask=(padded != 0).long()).logits
        hidden = model.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(short, model.classifier(hidden.mean(dim=1)))


def test_a_saved_mean_pooling_model_reloads_as_itself_and_predicts(tmp_path):
    model = build_model("tiny-bert", LABELS, 3, pooling="mean").eval()
    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded) is MeanPoolingBertForSequenceClassification
    batch = {"input_ids": torch.tensor([[101, 2307, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reloaded(**batch).logits)
    from sepal.model import load_tokenizer

    load_tokenizer("tiny-bert").save_pretrained(str(tmp_path))
    answer = subprocess.run([sys.executable, "-m", "server.predict", "--model", str(tmp_path),
                             "a fine film"], capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr
    assert '"label": "' in answer.stdout


def test_head_only_trains_and_exchanges_the_classifier_alone(sst2):
    cfg = RunConfig.from_mapping({**TINY_RUN, "max-train-examples": 64, "trainable": "head",
                                  "pooling": "mean", "learning-rate": 1e-2})
    initial = get_weights(build_task_model(cfg, LABELS))
    assert sorted(initial) == ["classifier.bias", "classifier.weight"]
    training = LocalTraining(cfg, NodeData(partition_id=0, num_partitions=1), LABELS,
                             torch.device("cpu"))
    encoder = {n: p.detach().clone() for n, p in training.model.bert.named_parameters()}
    policy = EffectivePrivacy.combine(DPSGDConfig(dp_sgd=True), SitePolicy(), num_examples=64)
    privacy = ClientPrivacy.calibrated(policy, LocalPlan(64, 16, 1, 2))
    assert privacy.grad_sample_mode(training.model) == "hooks"
    training.run(initial, server_round=1, privacy=privacy)
    after = training.local_weights()
    assert sorted(after) == sorted(initial)
    assert not np.allclose(after["classifier.weight"], initial["classifier.weight"])
    assert all(torch.equal(encoder[n], p) for n, p in training.model.bert.named_parameters())
    assert sum(steps for _, _, steps in privacy.accountant.history) == 4
    # the server's evaluator builds the same two tensors and loads the update
    ServerEvaluator(cfg, LABELS).model.load_state_dict(training.model.state_dict())


def test_contradictory_or_unknown_model_choices_name_the_key():
    with pytest.raises(ConfigError, match="'trainable'.*'lora'"):
        build_task_model(RunConfig(model="tiny-bert", trainable="head"), LABELS,
                         LoraConfig(lora=True))
    with pytest.raises(ConfigError, match="run config 'pooling'"):
        RunConfig.from_mapping({"pooling": "max"})
    with pytest.raises(ConfigError, match="run config 'trainable'"):
        RunConfig.from_mapping({"trainable": "encoder"})


def test_minilm_mean_pooling_is_the_checkpoints_own_sentence_embedding():
    """The real MiniLM: our pooled vector, normalized, is what sentence-transformers encodes."""
    from sentence_transformers import SentenceTransformer

    from sepal.model import load_tokenizer, packaged_minilm_path

    texts = ["a gorgeous, witty, seductive movie .", "dull"]
    model = build_model("minilm", LABELS, 0).eval()
    assert isinstance(model, MeanPoolingBertForSequenceClassification)
    captured = []
    model.classifier.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    encoded = load_tokenizer("minilm")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**encoded)
    reference = SentenceTransformer(str(packaged_minilm_path()), device="cpu").encode(
        texts, convert_to_tensor=True)
    torch.testing.assert_close(torch.nn.functional.normalize(captured[0], dim=-1), reference,
                               rtol=1e-4, atol=1e-5)
