"""Sample-level DP-SGD on a client: clipping, accounting, persistence, site budgets.

Real Opacus on the tiny random BERT and real SST-2 sentences; the client app's own
``train`` function is called with Flower Message/Context objects, as a SuperNode would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Metadata
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from opacus.accountants import RDPAccountant

from sepal import wire
from sepal.config import ConfigError, RunConfig
from sepal.data import collate, make_loader
from sepal.lora import LoraConfig
from sepal.model import build_model, get_weights
from sepal.privacy import (
    DPSGDConfig,
    EffectivePrivacy,
    PrivacyLedger,
    PrivacyRefusal,
    SitePolicy,
    UserLevelDPConfig,
    site_policy,
)
from sepal.privacy.engine import ClientPrivacy, LocalPlan, check_run_settings
from sepal.privacy.site_ledger import Account
from sepal.task import NodeData, tokenized_node_split
from sepal.training import MODEL_INPUTS
from tests.conftest import PROJECT_ROOT, SST2
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

LABELS = ["negative", "positive"]
# 160 SST-2 sentences over 2 partitions: 80 per node, batch 16 -> q = 0.2, 5 steps per round
RUN = {
    "model": "tiny-bert", "dataset": str(SST2), "max-train-examples": 160, "max-seq-length": 32,
    "batch-size": 16, "num-server-rounds": 3, "learning-rate": 1e-3, "seed": 42,
    "dp-sgd": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5,
}
DP = DPSGDConfig.from_mapping(RUN)
NODE = {"partition-id": 0, "num-partitions": 2}
LEDGER = PrivacyLedger("study-1")


def train_config(server_round: int, ledger: PrivacyLedger = LEDGER) -> ConfigRecord:
    return ConfigRecord({"label-names": LABELS, "server-round": server_round,
                         **ledger.to_config()})


def train_message(server_round: int, ledger: PrivacyLedger = LEDGER) -> Message:
    weights = get_weights(build_model("tiny-bert", LABELS, 42))
    content = RecordDict({
        wire.ARRAYS_KEY: wire.arrays_to_record(weights),
        wire.CONFIG_KEY: train_config(server_round, ledger),
    })
    metadata = Metadata(run_id=1, message_id=f"train-{server_round}", src_node_id=0,
                        dst_node_id=7, reply_to_message_id="", group_id=str(server_round),
                        created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=metadata)


def client_context(node_config: dict, state: RecordDict | None = None, run_id: int = 1,
                   **run_config) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=node_config,
                   state=state if state is not None else RecordDict(),
                   run_config={**RUN, **run_config})


def independent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float,
                        count_sigma: float | None = None) -> float:
    """Google's dp-accounting (not Opacus) for ``steps`` Poisson-sampled Gaussian steps and,
    with ``count_sigma``, one Gaussian count release, on Opacus' grid of RDP orders
    (dp-accounting skips the few it cannot evaluate)."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    if count_sigma is not None:
        accountant.compose(dp_accounting.GaussianDpEvent(count_sigma))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("lora", [False, True], ids=["full-ghost", "lora-hooks"])
def test_per_example_gradients_are_clipped_to_the_bound(lora):
    """With noise 0, the DP gradient of a real batch is the mean of per-example gradients
    each clipped to C, computed here one example at a time without Opacus."""
    cfg = RunConfig.from_mapping(RUN)
    dataset = tokenized_node_split(cfg, NodeData(partition_id=0, num_partitions=2), "train")
    model = build_model("tiny-bert", LABELS, 1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the per-example reference must see the same function
    model = LoraConfig(lora=lora).apply(model).eval()  # as from_pretrained returns it
    bound = 0.05
    policy = EffectivePrivacy(target_epsilon=8.0, delta=1e-5, max_epsilon=None,
                              min_noise_multiplier=0.0, max_grad_norm=bound, accountant="rdp",
                              grad_sample_mode="auto")
    privacy = ClientPrivacy(policy, LocalPlan(len(dataset), 16, 1, 1), noise_multiplier=0.0)
    assert privacy.grad_sample_mode(model) == ("hooks" if lora else "ghost")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    batch = collate([dataset[i] for i in range(8)])
    inputs = {key: batch[key] for key in MODEL_INPUTS}

    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    loader = make_loader(dataset, 16, True, 0)
    with privacy.attach(model, optimizer, loader) as (dp_opt, loss_fn, _):
        loss = (loss_fn or torch.nn.CrossEntropyLoss())(model(**inputs).logits, batch["labels"])
        dp_opt.zero_grad()
        loss.backward()
        dp_opt.pre_step()  # clip, add (zero) noise, scale by the expected batch size
        private = {name: p.grad.detach().clone() for name, p in params.items()}
        expected_batch = dp_opt.expected_batch_size

    reference = {name: torch.zeros_like(p) for name, p in params.items()}
    norms = []
    for i in range(8):
        model.zero_grad()
        logits = model(**{key: value[i:i + 1] for key, value in inputs.items()}).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"][i:i + 1]).backward()
        norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params.values())))
        norms.append(norm)
        for name, p in params.items():
            reference[name] += p.grad * min(1.0, bound / norm)
    assert min(norms) > 10 * bound, "the bound must actually bite on this batch"
    for name in params:
        torch.testing.assert_close(private[name], reference[name] / expected_batch,
                                   rtol=1e-4, atol=1e-8)
    total = float(torch.sqrt(sum((g ** 2).sum() for g in private.values())))
    assert total <= 8 * bound / expected_batch * (1 + 1e-5)


def test_epsilon_is_cumulative_across_a_fresh_process(tmp_path):
    """Round 1 in this process; round 2 in a new Python process fed only the node's
    context.state (serialized as Flower serializes it); round 3 back here. The ε reported
    each round equals Google's dp-accounting for the same q, noise and step count plus the
    one noisy count; the reply carries that count and nothing else of the data."""
    from client.app import train

    context = client_context(dict(NODE))
    first = train(train_message(1), context)
    report = first.content[wire.PRIVACY_KEY]
    sigma = report["noise-multiplier"]
    assert (report["sample-rate"], report["steps"]) == (0.2, 5)
    curve = [independent_epsilon(sigma, 0.2, 5 * r, 1e-5, count_sigma=20.0) for r in (1, 2, 3)]
    assert 7.98 <= curve[2] <= 8.01  # calibrated once: 3 rounds and the count end at 8
    assert report["epsilon"] == pytest.approx(curve[0], rel=1e-3)
    metrics = first.content[wire.METRICS_KEY]
    assert set(metrics) == {wire.NUM_EXAMPLES}
    count = metrics[wire.NUM_EXAMPLES]

    state_file = tmp_path / "state.pb"
    state_file.write_bytes(recorddict_to_proto(context.state).SerializeToString())
    script = f"""
import json
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict
from tests.test_privacy_client import client_context, train_message, NODE
from client.app import train
proto = RecordDict()
proto.ParseFromString(open({str(state_file)!r}, "rb").read())
context = client_context(dict(NODE), recorddict_from_proto(proto))
reply = train(train_message(2), context)
open({str(state_file)!r}, "wb").write(recorddict_to_proto(context.state).SerializeToString())
print(json.dumps({{**dict(reply.content["privacy"]), **dict(reply.content["metrics"])}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, check=True,
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
                                    "OMP_NUM_THREADS": "1"})
    second = json.loads(completed.stdout.strip().splitlines()[-1])
    assert second["noise-multiplier"] == sigma and second["steps"] == 10
    assert second["epsilon"] == pytest.approx(curve[1], rel=1e-3)
    assert second[wire.NUM_EXAMPLES] == count  # released once per run, then repeated

    proto = ProtoRecordDict()
    proto.ParseFromString(state_file.read_bytes())
    third = train(train_message(3), client_context(dict(NODE), recorddict_from_proto(proto)))
    assert third.content[wire.PRIVACY_KEY]["epsilon"] == pytest.approx(curve[2], rel=1e-3)
    assert third.content[wire.METRICS_KEY][wire.NUM_EXAMPLES] == count


def test_a_site_can_force_dp_and_only_tighten():
    run = DPSGDConfig.from_mapping({"dp-sgd": False, "dp-delta": 1e-5,
                                         "dp-simulated-site-policy": "0: dp-max-epsilon=1.0"})
    own = {"partition-id": 0, "dp-max-epsilon": 3.0, "dp-force": True, "dp-delta": 1e-6,
           "dp-min-noise-multiplier": 10.0, "dp-state-dir": "/var/lib/site/privacy"}
    policy = EffectivePrivacy.combine(run, site_policy(own, run), 80)
    assert policy is not None  # forced on although the run has dp-sgd off
    assert policy.max_epsilon == 1.0 and policy.delta == 1e-6  # stricter of run and site
    assert policy.target_epsilon == 1.0  # a forced site calibrates to its own budget
    loose = DPSGDConfig.from_mapping(
        {"dp-sgd": True, "dp-simulated-site-policy": "0: dp-max-epsilon=50"})
    assert site_policy(own, loose).dp_max_epsilon == 3.0  # a run cannot loosen a site
    assert EffectivePrivacy.combine(DPSGDConfig(), SitePolicy(), 80) is None
    capped = EffectivePrivacy.combine(DPSGDConfig(), SitePolicy(dp_max_epsilon=2.0,
                                                                  dp_state_dir="/x"), 80)
    assert capped is not None and capped.target_epsilon == 2.0  # a cap implies DP-SGD
    # the site's noise floor beats the run's calibration
    plan = LocalPlan(80, 16, 1, 3)
    privacy = ClientPrivacy.calibrated(policy, plan)
    assert privacy.noise_multiplier == 10.0
    # a floor raised mid-run applies from the next round on
    account = Account(history=[], noise_multipliers={"study-1": privacy.noise_multiplier})
    stricter = dataclasses.replace(policy, min_noise_multiplier=12.0)
    assert ClientPrivacy.for_account(stricter, plan, "study-1", account).noise_multiplier == 12.0


def test_a_restarted_supernode_continues_from_its_state_dir(tmp_path):
    """``dp-state-dir``: a fresh context.state (SuperNode restarted mid-run) continues from
    the site's ledger on disk instead of counting from zero; an unreadable ledger stops it."""
    cfg = RunConfig.from_mapping(RUN)
    node_config = {**NODE, "dp-state-dir": str(tmp_path / "privacy")}
    first = ClientPrivacy.for_node(client_context(node_config), cfg, DP, 80, train_config(1))
    assert first.steps_taken == 5  # charged before training
    assert {p.name for p in (tmp_path / "privacy").iterdir()} - {"privacy-ledger.json.lock"} \
        == {"privacy-ledger.json"}

    restarted = ClientPrivacy.for_node(client_context(node_config), cfg, DP, 80, train_config(2))
    assert restarted.steps_taken == 10 and restarted.noise_multiplier == first.noise_multiplier
    assert restarted.count == first.count
    (tmp_path / "privacy" / "privacy-ledger.json").write_text("{not json")
    with pytest.raises(PrivacyRefusal, match="'dp-state-dir'"):
        ClientPrivacy.for_node(client_context(node_config), cfg, DP, 80, train_config(3))


def test_a_resumed_run_continues_the_ledger_from_the_state_dir(tmp_path):
    """Rounds 1-2 in Flower run 1; the server crashes and resumes the run (same run-name,
    2 more rounds) as Flower run 2, whose context.state is empty. Round 3 continues the
    site's ε curve and noise multiplier from its own file: the ε it reports is that of 3
    rounds of steps, and the noise is not recalibrated for the longer run."""
    from client.app import train

    node_config = {**NODE, "dp-state-dir": str(tmp_path / "privacy")}
    context = client_context(node_config)
    train(train_message(1), context)
    sigma = train(train_message(2), context).content[wire.PRIVACY_KEY]["noise-multiplier"]

    resumed = client_context(node_config, run_id=2, **{"num-server-rounds": 5})
    reply = train(train_message(3, PrivacyLedger("study-1", resumed_at_round=3)), resumed)
    assert wire.UPDATE_KEY in reply.content
    report = reply.content[wire.PRIVACY_KEY]
    assert (report["noise-multiplier"], report["steps"]) == (sigma, 15)
    fresh = RDPAccountant()
    fresh.history = [(sigma, 0.2, 15), (20.0, 1.0, 1)]
    assert report["epsilon"] == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=1e-9)
    assert report["epsilon"] == pytest.approx(
        independent_epsilon(sigma, 0.2, 15, 1e-5, count_sigma=20.0), rel=1e-3)
    recalibrated = ClientPrivacy.calibrated(
        EffectivePrivacy.combine(DPSGDConfig.from_mapping(RUN), SitePolicy(), 80),
        LocalPlan(80, 16, 1, 5))
    assert recalibrated.noise_multiplier > sigma  # what a recalibration would have used


def test_a_resumed_run_without_a_state_dir_is_refused_not_counted_from_zero(tmp_path):
    """Without ``dp-state-dir`` the ε spent before the resume lived only in the interrupted
    Flower run's context.state: the site refuses and does not train."""
    from client.app import train

    resumed = PrivacyLedger("study-1", resumed_at_round=3)
    reply = train(train_message(3, resumed), client_context(dict(NODE), run_id=2))
    assert wire.UPDATE_KEY not in reply.content and wire.PRIVACY_KEY not in reply.content
    refusal = reply.content[wire.REFUSAL_KEY]
    assert refusal["code"] == "ledger-unavailable"
    assert "resumed at round 3" in refusal["reason"] and "'dp-state-dir'" in refusal["reason"]

    cfg = RunConfig.from_mapping(RUN)
    with pytest.raises(PrivacyRefusal, match="ledger-unavailable: the train config names no"):
        ClientPrivacy.for_node(client_context(dict(NODE)), cfg, DP, 80, ConfigRecord())
    # with a state dir the ledger holds everything the data spent: an empty one, nothing
    with_dir = client_context({**NODE, "dp-state-dir": str(tmp_path)}, run_id=2)
    assert ClientPrivacy.for_node(with_dir, cfg, DP, 80, train_config(3, resumed)).steps_taken == 5


@pytest.mark.parametrize("run_config, node_config, key", [
    ({"dp-target-epsilon": 0.0}, {}, "'dp-target-epsilon'"),
    ({"dp-target-epsilon": -1.0}, {}, "'dp-target-epsilon'"),
    ({"dp-delta": 1.0}, {}, "'dp-delta'"),
    ({"dp-max-grad-norm": 0.0}, {}, "'dp-max-grad-norm'"),
    ({"dp-accountant": "moments"}, {}, "'dp-accountant'"),
    ({"dp-simulated-site-policy": "first: dp-max-epsilon=1"}, {}, "'dp-simulated-site-policy'"),
    ({"dp-simulated-site-policy": "0: dp-max-epsilom=1"}, {}, "unknown keys ['dp-max-epsilom']"),
    ({"user-dp": "server-fixed", "user-dp-noise-multiplier": 0.0}, {},
     "'user-dp-noise-multiplier'"),
    ({"user-dp": "central"}, {}, "'user-dp'"),
    ({}, {"dp-max-epsilon": -1.0}, "node config 'dp-max-epsilon'"),
    ({}, {"dp-delta": 2.0}, "node config 'dp-delta'"),
    ({}, {"dp-max-epsilom": 1.0}, "'dp-max-epsilom'"),
    ({}, {"max-epsilon": 1.0}, "['max-epsilon'] not privacy policy keys"),
    ({"dp-target-epsilon": 1e9}, {}, "'dp-target-epsilon' must be a number in (0, 100]"),
    ({"dp-target-epsilon": float("inf")}, {}, "'dp-target-epsilon'"),
    ({"dp-max-grad-norm": float("inf")}, {}, "'dp-max-grad-norm' must be a finite number"),
    ({"dp-max-grad-norm": float("nan")}, {}, "'dp-max-grad-norm'"),
    ({"user-dp": "client-fixed", "user-dp-clipping-norm": float("inf")}, {},
     "'user-dp-clipping-norm' must be a finite number"),
    ({}, {"dp-max-epsilon": 1e9}, "node config 'dp-max-epsilon' must be a number in (0, 100]"),
    ({}, {"dp-max-epsilon": float("nan")}, "node config 'dp-max-epsilon'"),
    ({}, {"dp-count-noise-multiplier": 0.0}, "node config 'dp-count-noise-multiplier'"),
    ({"dp-simulated-site-policy": "0: dp-count-noise-multiplier=0.5"}, {},
     "'dp-count-noise-multiplier'"),
])
def test_impossible_settings_name_the_setting(run_config, node_config, key):
    with pytest.raises(ConfigError) as err:
        run = DPSGDConfig.from_mapping(run_config)
        UserLevelDPConfig.from_mapping(run_config)
        site_policy(node_config, run)
    assert key in str(err.value)


def test_server_start_up_rejects_delta_and_budget_no_client_can_meet():
    cfg = RunConfig.from_mapping(RUN)
    with pytest.raises(ConfigError,
                       match=r"run config 'dp-delta' 0.01 must be below 1/n = 0.00625"):
        check_run_settings(DPSGDConfig(dp_sgd=True, dp_delta=0.01), cfg, 160)
    with pytest.raises(ConfigError,
                       match="'dp-target-epsilon' 1e-09 is too small for even one step"):
        check_run_settings(DPSGDConfig(dp_sgd=True, dp_target_epsilon=1e-9), cfg, 160)


@pytest.mark.parametrize("run_config, node_config, fragment", [
    ({}, {"dp-max-epsilon": 0.05, "dp-state-dir": "{tmp}"},
     "'dp-max-epsilon' 0.05 is below the ε of the noisy example count alone"),
    ({"dp-delta": 0.05}, {}, "'dp-delta' 0.05 must be below 1/n = 0.0125"),
    ({}, {"dp-max-epsilon": "lots"}, "node config 'dp-max-epsilon' must be a finite number"),
    ({}, {"dp-max-epsilon": 4.0}, "node config 'dp-max-epsilon' 4 is a lifetime cap"),
    ({"dp-sgd": False}, {"dp-force": True}, "node config 'dp-force' needs this site's own"),
])
def test_a_site_that_can_never_train_refuses_with_invalid_setting(run_config, node_config,
                                                                   fragment, tmp_path):
    """In deployment the server checks δ against its own data, never a site's n."""
    from client.app import train

    node_config = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                   for k, v in node_config.items()}
    context = client_context({**NODE, **node_config})
    context.run_config.update(run_config)
    reply = train(train_message(1), context)
    refusal = reply.content[wire.REFUSAL_KEY]
    assert refusal["code"] == "invalid-setting"
    assert fragment in refusal["reason"]
    assert wire.UPDATE_KEY not in reply.content


@pytest.mark.parametrize("lora", [False, True], ids=["full-ghost", "lora-hooks"])
def test_without_noise_or_clipping_a_dp_step_is_the_plain_gradient(lora):
    """Opacus' per-example path around our models (ghost for full fine-tuning, hooks
    around peft's adapters and head) must reduce to the ordinary mean gradient when
    sigma = 0 and nothing is clipped; a wrong per-example gradient fails here."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = build_model("tiny-bert", LABELS, 0)
    if lora:
        model = LoraConfig(lora=True, lora_r=2).apply(model)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch, length = 8, 16
    inputs = {"input_ids": torch.randint(5, 1000, (batch, length)),
              "attention_mask": torch.ones(batch, length, dtype=torch.long),
              "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
              "position_ids": torch.arange(length).expand(batch, length).contiguous()}
    labels = torch.randint(0, 2, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels), params)

    loader = DataLoader(TensorDataset(*inputs.values(), labels), batch_size=batch)
    hooks, optimizer, *criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.1),
        criterion=torch.nn.CrossEntropyLoss(), data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=1e6, poisson_sampling=False, grad_sample_mode="hooks" if lora else "ghost",
        wrap_model=False)
    loss_fn = criterion[0] if criterion else torch.nn.CrossEntropyLoss()
    optimizer.zero_grad()
    loss_fn(model(**inputs).logits, labels).backward()
    optimizer.pre_step()
    hooks.cleanup()
    for param, expected in zip(params, plain):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-7)
