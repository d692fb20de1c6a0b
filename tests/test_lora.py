"""LoRA option: only adapters and classifier are trained and exchanged; export merges."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from client.local_training import LocalTraining
from sepal.config import ConfigError, RunConfig
from sepal.data import collate
from sepal.lora import LoraConfig
from sepal.model import build_model, exchanged_parameters, get_weights
from sepal.privacy import DPSGDConfig, EffectivePrivacy, SitePolicy
from sepal.privacy.engine import ClientPrivacy, LocalPlan
from sepal.task import NodeData, tokenized_node_split
from sepal.training import MODEL_INPUTS
from server.evaluation import ServerEvaluator
from tests.conftest import SST2
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

LABELS = ["negative", "positive"]
LORA = LoraConfig(lora=True, lora_r=4, lora_alpha=8.0, lora_target_modules="query,value")
CFG = RunConfig(model="tiny-bert", dataset=str(SST2), test_split="dev", max_train_examples=64,
                max_test_examples=32, max_seq_length=32, batch_size=16, learning_rate=1e-2,
                num_server_rounds=2)


def test_only_adapters_and_classifier_travel_and_a_dp_round_leaves_the_base_untouched():
    server_weights = get_weights(LORA.apply(build_model("tiny-bert", LABELS, CFG.seed)))
    # 2 layers x (query, value) x (A: 4x64, B: 64x4) + classifier 64x2 + 2
    assert sum(w.size for w in server_weights.values()) == 2 * 2 * 2 * 4 * 64 + 130
    assert all("lora_" in name or "classifier" in name for name in server_weights)

    node = NodeData(partition_id=0, num_partitions=1)
    training = LocalTraining(CFG, node, LABELS, torch.device("cpu"), lora=LORA)
    embeddings = training.model.get_base_model().bert.embeddings.word_embeddings.weight
    frozen = embeddings.detach().clone()
    policy = EffectivePrivacy.combine(DPSGDConfig(dp_sgd=True), SitePolicy(), num_examples=64)
    privacy = ClientPrivacy.calibrated(policy, LocalPlan(64, 16, 1, 2))
    training.run(server_weights, 1, privacy)
    local = training.local_weights()
    assert list(local) == list(server_weights)
    assert any(not (local[k] == server_weights[k]).all() for k in local)
    assert torch.equal(frozen, embeddings)
    assert sum(steps for _, _, steps in privacy.accountant.history) == 4  # DP steps taken


def test_export_merges_adapters_so_plain_transformers_loads_the_same_model(tmp_path):
    evaluator = ServerEvaluator(CFG, LABELS, LORA)
    weights = get_weights(evaluator.model)
    with torch.no_grad():
        for name in weights:
            weights[name] = weights[name] + 0.05  # non-zero B: adapters change the output
    evaluator.export(weights, tmp_path / "model")
    exported = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model")).eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    dataset = tokenized_node_split(CFG, NodeData(partition_id=0, num_partitions=1), "dev")
    batch = collate([dataset[i] for i in range(4)])
    inputs = {key: batch[key] for key in MODEL_INPUTS}
    evaluator.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, evaluator.model(**inputs).logits,
                                   rtol=1e-4, atol=1e-5)
    assert len(exchanged_parameters(evaluator.model)) == len(weights)  # export left it intact


def test_unknown_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="'lora-target-modules' names modules \\['q_proj'\\]"):
        LoraConfig(lora=True, lora_target_modules="q_proj").apply(
            build_model("tiny-bert", LABELS, 0))
    with pytest.raises(ConfigError, match="'lora-r'"):
        LoraConfig.from_mapping({"lora": True, "lora-r": 0})


def test_target_modules_match_a_dotted_path_suffix_as_peft_does():
    model = LoraConfig(lora=True, lora_r=2, lora_target_modules="pooler.dense").apply(
        build_model("tiny-bert", LABELS, 0))
    adapted = {name.split(".lora_")[0] for name, p in model.named_parameters()
               if p.requires_grad and ".lora_" in name}
    assert adapted == {"base_model.model.bert.pooler.dense"}  # not every '.dense'
    with pytest.raises(ConfigError, match="names modules \\['encoder.dense'\\]"):
        LoraConfig(lora=True, lora_target_modules="encoder.dense").apply(
            build_model("tiny-bert", LABELS, 0))
