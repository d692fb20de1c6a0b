"""A site's budget holds against whoever submits the run.

Each test is one way a run's submitter could spend more of a site's ε than its
``dp-max-epsilon`` allows (renaming the run, a new Flower run, two runs at once, setting
ε or δ from the run config, sizes where a projection could disagree with Opacus) and
checks that the site's lifetime ledger stops it. Real Opacus accountants; the client's
own ``ClientPrivacy.for_node`` and ``train`` as a SuperNode calls them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from sepal import wire
from sepal.config import RunConfig
from sepal.privacy import PrivacyLedger, PrivacyRefusal
from sepal.privacy.config import DPSGDConfig, EffectivePrivacy
from sepal.privacy.engine import ClientPrivacy, LocalPlan, _noisy_count
from sepal.privacy.site_ledger import LEDGER_FILE, DatasetIdentity, SiteLedger
from tests.conftest import PROJECT_ROOT
from tests.test_privacy_client import NODE, RUN, client_context, train_config, train_message
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

CAP = 3.0
CFG = RunConfig.from_mapping(RUN)
DP = DPSGDConfig.from_mapping(RUN)


def capped_node(state_dir: Path, **extra) -> dict:
    return {**NODE, "dp-max-epsilon": CAP, "dp-state-dir": str(state_dir), **extra}


def round_of(node_config: dict, run: str, server_round: int, run_id: int = 1,
             state: RecordDict | None = None, **run_config) -> ClientPrivacy:
    context = client_context(node_config, state, run_id=run_id, **run_config)
    return ClientPrivacy.for_node(context, CFG, DPSGDConfig.from_mapping(context.run_config),
                                  80, train_config(server_round, PrivacyLedger(run)))


def exhaust(node_config: dict, run: str, run_id: int = 1) -> list[float]:
    """Rounds of ``run`` until the site refuses; returns the ε after each trained round."""
    spent = []
    for server_round in range(1, 20):
        try:
            spent.append(round_of(node_config, run, server_round, run_id).epsilon())
        except PrivacyRefusal as refusal:
            assert refusal.refusal.code == "budget-exhausted", refusal.refusal
            assert "over all runs" in refusal.refusal.reason
            return spent
    raise AssertionError("the site never refused")


def ledger_epsilon(state_dir: Path, delta: float = 1e-5) -> float:
    """ε of everything the ledger file holds, recomputed here with a fresh accountant."""
    ledger = json.loads((state_dir / LEDGER_FILE).read_text())
    history = [tuple(e) for entry in ledger["datasets"].values() for e in entry["history"]]
    accountant = RDPAccountant()
    accountant.history = history
    return accountant.get_epsilon(delta=delta)


def test_a_renamed_run_gets_no_fresh_budget(tmp_path):
    """A renamed run continues the data's lifetime count: it is refused at once, or
    calibrated to what is left of the cap, and the ledger never passes the cap."""
    node = capped_node(tmp_path)
    first = exhaust(node, "study-1")
    assert len(first) == 3 and max(first) <= CAP
    for name in ("study-2", "study-1-v2", "x" * 300):
        later = exhaust(node, name, run_id=7)
        assert all(epsilon > first[-1] for epsilon in later)  # never from zero
    assert first[-1] <= ledger_epsilon(tmp_path) <= CAP


def test_a_new_flower_run_without_resume_continues_the_lifetime_count(tmp_path):
    """Same run-name, new Flower run id, empty context.state, not marked as resumed."""
    node = capped_node(tmp_path)
    first = round_of(node, "study-1", 1, run_id=1)
    again = round_of(node, "study-1", 1, run_id=2)
    assert again.steps_taken == 2 * first.steps_taken
    assert again.epsilon() > first.epsilon()
    exhaust(node, "study-1", run_id=3)
    with pytest.raises(PrivacyRefusal, match="budget-exhausted"):
        round_of(node, "study-1", 1, run_id=4)


def test_interleaved_runs_see_each_others_steps(tmp_path):
    """Two runs (their own names and context.state) alternate rounds on one site: each
    charge lands on the same ledger, and the cap holds for their sum."""
    node = capped_node(tmp_path)
    states = {"a": RecordDict(), "b": RecordDict()}
    steps, refused = 0, set()
    for server_round in range(1, 10):
        for run in ("a", "b"):
            if run in refused:
                continue
            try:
                privacy = round_of(node, run, server_round, state=states[run])
            except PrivacyRefusal:
                refused.add(run)
                continue
            steps += 5
            assert privacy.steps_taken == steps  # the other run's steps are counted
            assert privacy.epsilon() == pytest.approx(ledger_epsilon(tmp_path), rel=1e-9)
    assert refused == {"a", "b"}
    assert ledger_epsilon(tmp_path) <= CAP


def test_concurrent_processes_lose_no_charge(tmp_path):
    """Two processes charge one ledger 40 times each, as fast as they can: without the
    lock, read-modify-write races would drop some of the 80 releases."""
    script = """
import sys
from pathlib import Path
from sepal.privacy.site_ledger import DatasetIdentity, SiteLedger
ledger = SiteLedger(Path(sys.argv[1]))
for _ in range(40):
    with ledger.account(DatasetIdentity("site", "f")) as account:
        account.charge([(1.0, 0.1, 1)], dp_sgd_steps=1)
"""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env)
               for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    with SiteLedger(tmp_path).account(DatasetIdentity("site", "f")) as account:
        assert account.dp_sgd_steps == 80 and len(account.history) == 80


def test_the_run_cannot_choose_a_sites_epsilon_or_delta(tmp_path):
    """``dp-force`` with the run's ε is refused; with a cap the run's ε and δ can only
    tighten, and the site's δ defaults to min(1e-5, 1/(10 n))."""
    from client.app import train

    forced = {**NODE, "dp-force": True}
    reply = train(train_message(1), client_context(forced, **{"dp-target-epsilon": 100.0}))
    assert reply.content[wire.REFUSAL_KEY]["code"] == "invalid-setting"
    assert "'dp-force' needs this site's own budget" in reply.content[wire.REFUSAL_KEY]["reason"]

    loose = round_of(capped_node(tmp_path / "a"), "r", 1,
                     **{"dp-target-epsilon": 100.0, "dp-delta": 0.01})
    assert loose.policy.target_epsilon == CAP
    assert loose.policy.delta == 1e-5  # not the run's 0.01 (just below 1/n = 0.0125)
    strict = round_of(capped_node(tmp_path / "b"), "r", 1,
                      **{"dp-target-epsilon": 1.0, "dp-delta": 1e-7})
    assert (strict.policy.target_epsilon, strict.policy.delta) == (1.0, 1e-7)
    assert strict.noise_multiplier > loose.noise_multiplier
    site_delta = round_of(capped_node(tmp_path / "c", **{"dp-delta": 1e-6}), "r", 1,
                          **{"dp-delta": 1e-3})
    assert site_delta.policy.delta == 1e-6
    assert round_of(capped_node(tmp_path / "d"), "r", 1).policy.delta == 1e-5
    small = ClientPrivacy.for_node(client_context(capped_node(tmp_path / "e")), CFG, DP,
                                   20_000, train_config(1))
    assert small.policy.delta == 1 / 200_000  # 1/(10 n) below 1e-5


def test_the_server_cannot_run_a_capped_site_without_its_ledger():
    with pytest.raises(PrivacyRefusal, match="'dp-max-epsilon' 3 is a lifetime cap"):
        round_of({**NODE, "dp-max-epsilon": CAP}, "study-1", 1)


@pytest.mark.parametrize("batches", [93, 99, 105, 117, 123, 186])
def test_projection_uses_opacus_own_step_count(batches):
    """For these ceil(N/B), 1 / (1 / k) rounds below k and Opacus' Poisson loader draws
    k - 1 batches per epoch: the plan, the budget check and the accountant agree on it."""
    batch_size = 2
    num_examples = batches * batch_size - 1
    plan = LocalPlan(num_examples, batch_size, local_epochs=2, num_rounds=1)
    assert plan.batches_per_epoch == batches
    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.arange(num_examples)), batch_size=batch_size))
    drawn = sum(1 for _ in loader)
    assert drawn == batches - 1 == plan.steps_per_epoch
    assert loader.sample_rate == plan.sample_rate

    policy = EffectivePrivacy(target_epsilon=8.0, delta=1e-5, max_epsilon=None,
                              min_noise_multiplier=0.0, max_grad_norm=1.0, accountant="rdp",
                              grad_sample_mode="hooks")
    privacy = ClientPrivacy(policy, plan, noise_multiplier=1.0, count=1)
    projected = privacy.projected_epsilon()
    opacus = RDPAccountant()
    for _ in range(2 * drawn):  # what Opacus' optimizer hook records for two epochs
        opacus.step(noise_multiplier=1.0, sample_rate=loader.sample_rate)
    assert projected == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-12)


def test_a_dp_sites_reply_carries_no_loss_accuracy_steps_or_exact_count(tmp_path):
    from client.app import train

    context = client_context(capped_node(tmp_path))
    reply = train(train_message(1), context)
    metrics = reply.content[wire.METRICS_KEY]
    assert set(metrics) == {wire.NUM_EXAMPLES}
    count = metrics[wire.NUM_EXAMPLES]
    assert isinstance(count, int) and count >= 1
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    [entry] = ledger["datasets"].values()
    assert [20.0, 1.0, 1] in entry["history"]  # the count's release is charged
    assert entry["counts"] == {"study-1": count} and entry["count-releases"] == 1
    report = reply.content[wire.PRIVACY_KEY]
    assert report["neighbours"] == "add/remove one training example of the site"

    draws = [_noisy_count(80, 20.0) for _ in range(4000)]
    assert 78 <= statistics.mean(draws) <= 82 and 18 <= statistics.stdev(draws) <= 22
    assert len(set(draws)) > 50 and min(_noisy_count(1, 20.0) for _ in range(200)) == 1


def test_per_run_files_of_the_old_layout_are_counted_once(tmp_path):
    (tmp_path / "ledger-study-0.json").write_text(json.dumps({
        "accountant": "rdp", "noise-multiplier": 1.0, "history": json.dumps([[1.0, 0.2, 7]])}))
    node = {**NODE, "dp-state-dir": str(tmp_path)}
    first = round_of(node, "study-1", 1)
    second = round_of(node, "study-1", 2)
    assert (first.steps_taken, second.steps_taken) == (7 + 5, 7 + 10)
    (tmp_path / "ledger-broken.json").write_text("{")
    with pytest.raises(PrivacyRefusal, match="ledger-broken.json is not a readable"):
        round_of(node, "study-1", 3)


def test_copied_data_shares_its_account_and_other_data_does_not(tmp_path):
    for name, text in (("a", "text,label\nx,0\n"), ("copy", "text,label\nx,0\n"),
                       ("other", "text,label\ny,1\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.csv").write_text(text)
    ledger = SiteLedger(tmp_path / "state")
    with ledger.account(DatasetIdentity.of_folder(tmp_path / "a")) as account:
        account.charge([(1.0, 0.1, 3)], dp_sgd_steps=3)
    with ledger.account(DatasetIdentity.of_folder(tmp_path / "copy")) as account:
        assert account.dp_sgd_steps == 3
    with ledger.account(DatasetIdentity.of_folder(tmp_path / "other")) as account:
        assert account.dp_sgd_steps == 0
    (tmp_path / "a" / "train.csv").write_text("text,label\nx,0\nz,1\n")  # data added in place
    with ledger.account(DatasetIdentity.of_folder(tmp_path / "a")) as account:
        assert account.dp_sgd_steps == 3


def test_user_level_sensitivity_holds_after_the_uploads_rounding():
    """Clipped to C and then quantized, an update is longer than C (stochastic rounding
    adds variance); clipped to the rounding-aware norm, the decoded upload stays within C.
    Too few bits for that are refused, naming the setting."""
    from collections import OrderedDict

    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from sepal.codecs import build_codec, decode_upload
    from sepal.config import ConfigError
    from sepal.privacy import UserLevelDPConfig, clip_update
    from sepal.privacy.user_level import Rounding
    from sepal.secagg.config import SecAggConfig

    rng = np.random.default_rng(0)
    shapes = {"a": (300, 40), "b": (500,)}
    settings = UserLevelDPConfig(user_dp="client-fixed")
    config = ConfigRecord({KEY_CLIPPING_NORM: 1.0})

    def uploaded_norm(rounding: Rounding) -> float:
        update = OrderedDict((k, rng.normal(size=s).astype(np.float32)) for k, s in shapes.items())
        clip_update(update, config, settings, rounding)
        payload, params, _ = build_codec("q4:16").encode(update, None)
        decoded = decode_upload(payload, params, shapes)
        return float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in decoded.values())))

    dim = 300 * 40 + 500
    aware = Rounding.of_upload(dim, "q4:16", SecAggConfig())
    assert aware.relative == pytest.approx(2 * 4 / 15)
    assert max(uploaded_norm(aware) for _ in range(5)) <= 1.0
    assert min(uploaded_norm(Rounding()) for _ in range(5)) > 1.0  # naive clipping breaks C

    minilm = 22_700_000
    with pytest.raises(ConfigError, match="run config 'secagg-value-bits' too few"):
        Rounding.of_upload(minilm, "dense", SecAggConfig(
            secure_aggregation=True, secagg_value_bits=8)).clipping_norm(1.0)
    with pytest.raises(ConfigError, match="run config 'upload-codec' quantizes too coarsely"):
        Rounding.of_upload(minilm, "q2:4096", SecAggConfig()).clipping_norm(1.0)
    with pytest.raises(ConfigError, match="run config 'upload-codec'.*error feedback"):
        Rounding.of_upload(minilm, "q8,ef", SecAggConfig())
    secure = Rounding.of_upload(minilm, "dense", SecAggConfig(secure_aggregation=True))
    assert secure.clipping_norm(1.0) == pytest.approx(1.0 - np.sqrt(minilm) * 0.05 / 32767)


def test_the_privacy_statement_names_epsilon_delta_neighbours_and_what_is_not_covered():
    from server.privacy_statement import privacy_statement

    report = {"epsilon": 2.5, "delta": 1e-6, "accountant": "prv", "sample-rate": 0.125,
              "steps": 64, "noise-multiplier": 1.3, "max-grad-norm": 1.0,
              "count-noise-multiplier": 20.0, "max-epsilon": 4.0, "lifetime-ledger": True,
              "neighbours": "add/remove one training example of the site"}
    statement = privacy_statement({5: report, 9: {"epsilon": 1.0, "delta": "x"}},
                                  {"epsilon": 0.8, "delta": 1e-5})
    site = statement["sites"]["5"]
    assert site["statement"].startswith("Site 5: DP-SGD is (ε = 2.5, δ = 1e-06)-DP (prv")
    assert "add/remove one training example" in site["statement"]
    assert "64 steps" in site["statement"] and "rate 0.125" in site["statement"]
    assert "within its cap ε = 4" in site["statement"]
    assert statement["sites"]["9"]["delta"] is None  # a malformed report reads as unknown
    assert "zero-out" in statement["user_level"]["statement"]
    assert len(statement["not_covered"]) >= 4
