"""Local optimizers under DP-SGD: chunked logical batches, head/body rates, schedule, metrics."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from sepal.config import ConfigError, RunConfig
from sepal.data import collate, make_loader
from sepal.lora import LoraConfig
from sepal.model import build_model
from sepal.optim import LearningRateSchedule, build_optimizer, parameter_groups
from sepal.privacy.config import DPSGDConfig, EffectivePrivacy
from sepal.privacy.engine import ClientPrivacy, LocalPlan
from sepal.task import NodeData, tokenized_node_split
from sepal.training import per_class_scores, physical_chunks, train_epochs
from tests.conftest import SST2, TINY_RUN
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

LABELS = ["negative", "positive"]
RUN = {**TINY_RUN, "dataset": str(SST2)}


def tiny_model(lora: bool) -> torch.nn.Module:
    model = build_model("tiny-bert", LABELS, 1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # both paths must compute the same function
    return LoraConfig(lora=lora).apply(model)


def node_dataset(cfg: RunConfig):
    # 80 examples: batch 16 draws with q = 1/5, so Opacus' expected batch size is 16
    return tokenized_node_split(cfg, NodeData(partition_id=0, num_partitions=2), "train")


def no_clipping_policy(max_grad_norm: float = 1e6) -> EffectivePrivacy:
    return EffectivePrivacy(target_epsilon=8.0, delta=1e-5, max_epsilon=None,
                            min_noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                            accountant="rdp", grad_sample_mode="auto")


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("lora", [False, True], ids=["full-ghost", "lora-hooks"])
def test_a_chunked_dp_step_without_noise_or_clipping_equals_the_plain_step(optimizer, lora):
    cfg = RunConfig.from_mapping({**RUN, "optimizer": optimizer, "learning-rate": 1e-2,
                                  "head-learning-rate": 5e-2, "momentum": 0.5})
    dataset = node_dataset(cfg)
    assert len(dataset) % cfg.batch_size == 0
    batch = collate([dataset[i] for i in range(cfg.batch_size)])
    plain_model = tiny_model(lora)
    dp_model = copy.deepcopy(plain_model)
    start = trainable(plain_model)

    plain_opt = build_optimizer(plain_model, cfg)
    train_epochs(plain_model, [batch], plain_opt, 1, torch.device("cpu"))

    privacy = ClientPrivacy(no_clipping_policy(), LocalPlan(len(dataset), cfg.batch_size, 1, 1),
                            noise_multiplier=0.0)
    loader = make_loader(dataset, cfg.batch_size, True, 0)
    with privacy.attach(dp_model, build_optimizer(dp_model, cfg), loader) as (dp_opt, loss, _):
        assert dp_opt.expected_batch_size == cfg.batch_size
        stats = train_epochs(dp_model, [batch], dp_opt, 1, torch.device("cpu"), criterion=loss,
                             physical_batch_size=5)
    assert stats.steps == 1 and stats.examples == cfg.batch_size

    plain, private = trainable(plain_model), trainable(dp_model)
    moved = max(float((plain[name] - start[name]).abs().max()) for name in plain)
    assert moved > 1e-4, "the step must move the weights for the comparison to mean anything"
    for name in plain:  # AdamW's first step is ~lr * sign(g): float noise on tiny g shows
        torch.testing.assert_close(private[name], plain[name], rtol=1e-3, atol=5e-3 * 1e-2)


def test_chunked_accumulation_without_dp_equals_one_pass():
    cfg = RunConfig.from_mapping({**RUN, "optimizer": "sgd", "learning-rate": 0.1})
    dataset = node_dataset(cfg)
    batch = collate([dataset[i] for i in range(16)])
    whole, chunked = tiny_model(False), tiny_model(False)
    train_epochs(whole, [batch], build_optimizer(whole, cfg), 1, torch.device("cpu"))
    train_epochs(chunked, [batch], build_optimizer(chunked, cfg), 1, torch.device("cpu"),
                 physical_batch_size=3)
    for name, value in trainable(whole).items():
        torch.testing.assert_close(trainable(chunked)[name], value, rtol=1e-4, atol=1e-6)


def test_the_accountant_counts_logical_batches_not_physical_chunks():
    cfg = RunConfig.from_mapping(RUN)
    dataset = node_dataset(cfg)
    plan = LocalPlan(len(dataset), cfg.batch_size, 1, 1)
    privacy = ClientPrivacy(no_clipping_policy(1.0), plan, noise_multiplier=1.0)
    model = tiny_model(True)
    optimizer = build_optimizer(model, cfg)
    real_steps, forwards = [], []
    optimizer.register_step_post_hook(lambda *args: real_steps.append(1))
    model.register_forward_hook(lambda *args: forwards.append(1))
    loader = make_loader(dataset, cfg.batch_size, True, 0)
    with privacy.attach(model, optimizer, loader) as (dp_opt, loss, dp_loader):
        stats = train_epochs(model, dp_loader, dp_opt, 1, torch.device("cpu"), criterion=loss,
                             physical_batch_size=4)
    counted_by_opacus = sum(steps for _, _, steps in privacy.accountant.history)
    assert len(forwards) > len(real_steps) > 0, "batches must really run in several chunks"
    assert counted_by_opacus == len(real_steps) == stats.steps <= plan.steps_per_round


def test_physical_chunks_cover_the_batch_once_and_trim_padding(sst2):
    cfg = RunConfig.from_mapping(RUN)
    dataset = node_dataset(cfg)
    batch = collate([dataset[i] for i in range(16)])
    chunks = physical_chunks(batch, 5)
    assert [len(c["labels"]) for c in chunks] == [5, 5, 5, 1]
    assert sorted(torch.cat([c["labels"] for c in chunks]).tolist()) == \
        sorted(batch["labels"].tolist())
    for chunk in chunks:
        assert chunk["input_ids"].shape[1] == int(chunk["attention_mask"].sum(1).max())
    assert chunks[0]["input_ids"].shape[1] < batch["input_ids"].shape[1]
    assert physical_chunks(batch, 0) == [batch]


def test_the_head_and_the_body_get_their_own_learning_rates():
    model = tiny_model(True)
    cfg = RunConfig.from_mapping({**RUN, "learning-rate": 1e-3, "head-learning-rate": 5e-2})
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    head_names = {n for n, p in model.named_parameters()
                  if p.requires_grad and any(p is q for q in groups["head"]["params"])}
    assert head_names and all("classifier" in n for n in head_names)
    assert all("lora_" in n for n, p in model.named_parameters()
               if p.requires_grad and n not in head_names)
    assert (groups["body"]["lr"], groups["head"]["lr"]) == (1e-3, 5e-2)
    same = {g["name"]: g["lr"] for g in parameter_groups(model, RunConfig.from_mapping(RUN))}
    assert same == {"body": 1e-3, "head": 1e-3}
    assert isinstance(build_optimizer(model, RunConfig.from_mapping({**RUN, "optimizer": "sgd"})),
                      torch.optim.SGD)


def test_the_linear_schedule_decays_across_rounds_not_within_each():
    steps_per_round, rounds = 10, 3
    model = tiny_model(False)
    cfg = RunConfig.from_mapping({**RUN, "learning-rate": 1e-2, "head-learning-rate": 1e-1})
    rates = []
    for server_round in range(1, rounds + 1):
        optimizer = build_optimizer(model, cfg)
        stepper = LearningRateSchedule("linear", rounds * steps_per_round,
                                       first_step=(server_round - 1) * steps_per_round
                                       ).attach(optimizer)
        for _ in range(steps_per_round):
            rates.append([g["lr"] for g in optimizer.param_groups])
            stepper.step()
    body = [r[0] for r in rates]
    assert body[0] == pytest.approx(1e-2)
    assert body[steps_per_round] == pytest.approx(1e-2 * (1 - 10 / 30))
    assert all(a > b for a, b in zip(body, body[1:]))
    assert rates[-1][1] == pytest.approx(1e-1 / 30)
    constant = LearningRateSchedule("constant", 30, first_step=25)
    assert constant.factor() == 1.0


def test_per_class_scores_match_their_definitions():
    actual = np.array([0, 0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0, 1])
    scores = per_class_scores(actual, predicted, 4)
    assert scores[0].precision == pytest.approx(2 / 3) and scores[0].recall == 0.5
    assert scores[1].precision == pytest.approx(1 / 4) and scores[1].recall == 0.5
    assert scores[2].recall == 0.0 and scores[2].support == 1
    assert scores[3].support == 0 and scores[3].f1 == 0.0
    assert scores[0].f1 == pytest.approx(2 * 2 / (3 + 4))


@pytest.mark.parametrize("key, value", [
    ("optimizer", "adam"), ("lr-schedule", "cosine"), ("momentum", 1.0),
    ("physical-batch-size", -1), ("head-learning-rate", -1.0), ("weight-decay", 2.0),
    ("head-learning-rate", float("inf")),
])
def test_bad_optimizer_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_mapping({**RUN, key: value})


def test_head_and_body_are_clipped_to_their_shares_of_the_bound():
    cfg = RunConfig.from_mapping(RUN)
    dataset = node_dataset(cfg)
    bound, share = 0.05, 0.25
    policy = dataclasses.replace(no_clipping_policy(bound), head_clip_share=share)
    privacy = ClientPrivacy(policy, LocalPlan(len(dataset), cfg.batch_size, 1, 1),
                            noise_multiplier=0.0)
    model = tiny_model(True)
    optimizer = build_optimizer(model, cfg)
    bounds = privacy.group_clip_bounds(model, optimizer)
    assert float(np.linalg.norm(bounds)) == pytest.approx(bound)
    assert privacy.grad_sample_mode(model) == "hooks"
    head = {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n}
    one_example = collate([dataset[0]])
    with privacy.attach(model, optimizer, make_loader(dataset, 16, True, 0)) as (dp_opt, loss, _):
        train_epochs(model, [one_example], dp_opt, 1, torch.device("cpu"), criterion=loss)
        scale = dp_opt.expected_batch_size
        grads = {n: p.grad * scale for n, p in model.named_parameters() if p.requires_grad}
    head_norm = float(torch.sqrt(sum((g ** 2).sum() for n, g in grads.items() if n in head)))
    body_norm = float(torch.sqrt(sum((g ** 2).sum() for n, g in grads.items() if n not in head)))
    assert 0 < head_norm <= bound * share ** 0.5 * (1 + 1e-4)
    assert 0 < body_norm <= bound * (1 - share) ** 0.5 * (1 + 1e-4)
    assert head_norm == pytest.approx(bound * share ** 0.5, rel=1e-3), "the head's bound bites"


@pytest.mark.parametrize("values", [{"dp-head-clip-share": 1.0},
                                    {"dp-head-clip-share": 0.5, "dp-grad-sample-mode": "ghost"}])
def test_a_head_clip_share_opacus_cannot_apply_is_refused(values):
    with pytest.raises(ConfigError, match="'dp-head-clip-share'"):
        DPSGDConfig.from_mapping({"dp-sgd": True, **values})
