"""One client's sample-level DP-SGD, with Opacus, charged to its site's lifetime ledger.

Like Opacus' ``PrivacyEngine``, one object owns a round's privacy: the noise multiplier
(calibrated once per run, at the client's first round, and kept under the run's
``run-name``) and the accountant history. The history is the site's whole lifetime on
its data: with the node config's ``dp-state-dir`` it lives in the site's ledger
(``sepal/privacy/site_ledger.py``), shared by every run on that data; without one, in
the node's ``context.state`` for one Flower run. Each round is charged before it trains,
under the ledger's lock, and refused if the charge would take ε past the site's cap.

Planned steps: Opacus' Poisson loader samples each example with probability
``q = 1 / ceil(N / B)`` and draws ``int(1 / q)`` batches per epoch (one fewer than
``ceil(N / B)`` where floating point rounds ``1 / q`` down); the run plans ``T = rounds x
local-epochs x int(1 / q)`` steps, and the noise multiplier ``sigma`` is the smallest for
which T steps of the sampled Gaussian mechanism and the run's noisy count cost at most the
target ε at δ, and, on data that already spent some of a site's cap, for which the whole
lifetime stays within the cap.

Released per run besides the model update: one noisy example count,
``max(1, round(n + N(0, s^2)))`` with ``s`` = ``dp-count-noise-multiplier``, a Gaussian
mechanism of sensitivity 1 charged to the same history as ``(s, 1.0, 1)``, which FedAvg
uses as the site's weight. A DP site sends no training loss, accuracy or step counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from sepal.config import ConfigError, RunConfig
from sepal.optim import HEAD_MARKER
from sepal.privacy.config import SAMPLE_NEIGHBOURS, DPSGDConfig, EffectivePrivacy, site_policy
from sepal.privacy.ledger import PrivacyLedger
from sepal.privacy.refusal import (
    BUDGET_EXHAUSTED,
    INVALID_SETTING,
    LEDGER_UNAVAILABLE,
    PrivacyRefusal,
    Refusal,
)
from sepal.privacy.site_ledger import Account, DatasetIdentity, SiteLedger
from sepal.task import NodeData

STATE_KEY = "dp-sgd"


@dataclasses.dataclass(frozen=True)
class LocalPlan:
    """The DP-SGD steps a client plans for the run."""

    num_examples: int
    batch_size: int
    local_epochs: int
    num_rounds: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def sample_rate(self) -> float:
        return 1 / self.batches_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Batches Opacus' Poisson loader draws per epoch (its own count, ``int(1 / q)``)."""
        return len(UniformWithReplacementSampler(num_samples=self.num_examples,
                                                 sample_rate=self.sample_rate))

    @property
    def steps_per_round(self) -> int:
        return self.local_epochs * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round


class ClientPrivacy:
    """Sample-level DP of one client: calibration, accounting, budget, Opacus wrapping."""

    def __init__(self, policy: EffectivePrivacy, plan: LocalPlan, noise_multiplier: float,
                 history: list | tuple = (), steps_taken: int = 0, count: int | None = None):
        self.policy = policy
        self.plan = plan
        self.noise_multiplier = noise_multiplier
        self.accountant = create_accountant(policy.accountant)  # Opacus steps it in a round
        self.history = [tuple(entry) for entry in history]  # the data's lifetime releases
        self.steps_taken = steps_taken  # DP-SGD steps in that history
        self.count = count  # the noisy example count this run sends

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def for_node(cls, context: Context, cfg: RunConfig, run: DPSGDConfig, num_examples: int,
                 train_config: Mapping[str, Any]) -> ClientPrivacy | None:
        """This node's DP-SGD for the round, charged to its ledger; None when neither run
        nor site asks for DP-SGD. ``run``: the run's DP-SGD section; the site's policy
        comes from ``context``'s node config.

        Continues the noise multiplier the run (named by the server's ``privacy-ledger``
        in ``train_config``) calibrated at its first round, never recalibrated. Raises
        :class:`PrivacyRefusal` when the site must not train: impossible settings, a round
        that would take its data's lifetime ε past ``dp-max-epsilon``, or a resumed run
        whose spent ε this site cannot know.
        """
        try:
            policy = EffectivePrivacy.combine(run, site_policy(context.node_config, run),
                                              num_examples)
            if policy is None:
                return None
            ledger = PrivacyLedger.from_train_config(train_config)
            plan = LocalPlan(num_examples, cfg.batch_size, cfg.local_epochs, cfg.num_server_rounds)
            with _account(context, cfg, policy, ledger) as account:
                privacy = cls.for_account(policy, plan, ledger.name, account)
        except ConfigError as err:
            raise PrivacyRefusal(Refusal(INVALID_SETTING, str(err))) from err
        return privacy

    @classmethod
    def for_account(cls, policy: EffectivePrivacy, plan: LocalPlan, run: str,
                    account: Account) -> ClientPrivacy:
        """The round of run ``run`` on the data ``account`` keeps, charged to it."""
        sigma = account.noise_multipliers.get(run)
        if sigma is None:
            sigma = cls.calibrated_noise(policy, plan, account.history)
        # a site that raised its noise floor mid-run gets it from the next round on
        sigma = max(sigma, policy.min_noise_multiplier)
        privacy = cls(policy, plan, sigma, account.history, account.dp_sgd_steps,
                      account.counts.get(run))
        privacy.charge_round(account, run)
        return privacy

    @staticmethod
    def calibrated_noise(policy: EffectivePrivacy, plan: LocalPlan,
                         history: list | tuple = ()) -> float:
        """The noise multiplier for a run's planned steps and its noisy count: at most the
        target ε for the run alone and, with a cap, at most the cap for the data's lifetime
        ``history`` and the run together (when no noise can fit the cap, the budget check
        refuses). Raises ConfigError naming a setting that makes it impossible."""
        count = [(policy.count_noise_multiplier, 1.0, 1)]
        try:
            sigma = calibrate_noise(policy.target_epsilon, policy.delta, plan,
                                    policy.accountant, where="this site's", prior=count)
        except ConfigError as err:
            if policy.max_epsilon != policy.target_epsilon:
                raise
            raise ConfigError(
                f"node config 'dp-max-epsilon' {policy.max_epsilon:g} is below the ε of the "
                f"noisy example count alone (noise std 'dp-count-noise-multiplier' "
                f"{policy.count_noise_multiplier:g} at δ={policy.delta:g}): this site can "
                "never train; raise the cap or the count's noise") from err
        if policy.max_epsilon and history:
            with contextlib.suppress(ConfigError):
                sigma = max(sigma, calibrate_noise(policy.max_epsilon, policy.delta, plan,
                                                   policy.accountant, where="this site's",
                                                   prior=[*history, *count]))
        return sigma

    @classmethod
    def calibrated(cls, policy: EffectivePrivacy, plan: LocalPlan) -> ClientPrivacy:
        """A run's first round on unused data, not charged yet."""
        return cls(policy, plan, max(cls.calibrated_noise(policy, plan),
                                     policy.min_noise_multiplier))

    # -- accounting ---------------------------------------------------------------------

    def round_releases(self) -> list[tuple[float, float, int]]:
        """What one round adds to the history: its DP-SGD steps and, at the run's first
        round on this site, the noisy example count."""
        releases = [(self.noise_multiplier, self.plan.sample_rate, self.plan.steps_per_round)]
        if self.count is None:
            releases.append((self.policy.count_noise_multiplier, 1.0, 1))
        return releases

    def epsilon(self) -> float:
        return self._epsilon(self.history)

    def projected_epsilon(self, steps: int | None = None) -> float:
        """ε after the next round (or ``steps`` more DP-SGD steps) at the current noise
        and sampling rate."""
        releases = (self.round_releases() if steps is None
                    else [(self.noise_multiplier, self.plan.sample_rate, steps)])
        return self._epsilon(self.history + releases)

    def _epsilon(self, history: list) -> float:
        if not history:
            return 0.0
        accountant = create_accountant(self.policy.accountant)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=self.policy.delta))

    def charge_round(self, account: Account, run: str) -> None:
        """Charge the next round to ``account`` before any step is taken, or refuse it if
        it would take ε past the site's cap (then nothing is charged)."""
        self.check_budget()
        releases = self.round_releases()
        steps = self.plan.steps_per_round
        if self.count is None:
            self.count = _noisy_count(self.plan.num_examples, self.policy.count_noise_multiplier)
        account.charge(releases, dp_sgd_steps=steps, count_releases=len(releases) - 1)
        account.remember(run, noise_multiplier=self.noise_multiplier, count=self.count)
        self.history = list(account.history)
        self.steps_taken = account.dp_sgd_steps

    def check_budget(self) -> None:
        """Refuse a round that would take ε past the site's cap."""
        cap = self.policy.max_epsilon
        if cap is None:
            return
        steps = self.plan.steps_per_round
        projected = self.projected_epsilon()
        if projected <= cap:
            return
        if self.steps_taken == 0:
            refusal = Refusal(INVALID_SETTING, (
                f"node config 'dp-max-epsilon' {cap:g} is below the ε of a single round here "
                f"({projected:.4f} at δ={self.policy.delta:g} for {steps} steps at noise "
                f"multiplier {self.noise_multiplier:.4f}); this site can never train"))
        else:
            refusal = Refusal(BUDGET_EXHAUSTED, (
                f"this site's data has spent ε={self.epsilon():.4f} of node config "
                f"'dp-max-epsilon' {cap:g} at δ={self.policy.delta:g} over all runs; the next "
                f"round ({steps} steps) would reach ε={projected:.4f}"))
        raise PrivacyRefusal(refusal, self.report())

    def report(self) -> ConfigRecord:
        """What the client tells the server: its data's lifetime spending and how it is
        accounted (every round, refusals included)."""
        return ConfigRecord({
            "epsilon": self.epsilon(),
            "delta": self.policy.delta,
            "max-epsilon": self.policy.max_epsilon or 0.0,
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.plan.sample_rate,
            "steps": self.steps_taken,
            "max-grad-norm": self.policy.max_grad_norm,
            "count-noise-multiplier": self.policy.count_noise_multiplier,
            "accountant": self.policy.accountant,
            "neighbours": SAMPLE_NEIGHBOURS,
            "lifetime-ledger": bool(self.policy.state_dir),
        })

    # -- training -----------------------------------------------------------------------

    def grad_sample_mode(self, model: torch.nn.Module) -> str:
        """Ghost clipping for full fine-tuning; hooks when under a tenth of the parameters
        train (LoRA, head only): so few per-sample gradients are cheaper to materialize
        than ghost clipping's second backward pass."""
        if self.policy.grad_sample_mode != "auto":
            return self.policy.grad_sample_mode
        if self.policy.head_clip_share > 0:
            return "hooks"  # ghost clipping only clips flat
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return "hooks" if trainable * 10 < total else "ghost"

    def group_clip_bounds(self, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> list[float]:
        """Per-tensor bounds, in the optimizer's parameter order, for head/body clipping.

        The head's tensors share C*sqrt(s) and the body's C*sqrt(1 - s) evenly in squared
        norm, so the bounds' Euclidean norm, the sensitivity Opacus noises to, is C.
        """
        head_ids = {id(p) for name, p in model.named_parameters() if HEAD_MARKER in name}
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.requires_grad]
        in_head = [id(p) in head_ids for p in params]
        heads, bodies = sum(in_head), len(params) - sum(in_head)
        bound, share = self.policy.max_grad_norm, self.policy.head_clip_share
        if not heads or not bodies:
            return [bound / math.sqrt(len(params))] * len(params)
        return [bound * math.sqrt((share / heads) if head else ((1 - share) / bodies))
                for head in in_head]

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loader: DataLoader) -> Iterator[tuple[torch.optim.Optimizer, object, DataLoader]]:
        """One round under DP-SGD: yields (optimizer, criterion or None, Poisson loader).

        Noise and batch sampling draw from generators seeded from the OS, never from the
        run's seed: the server knows that seed and could otherwise regenerate and remove
        the noise. Every planned step is accounted, including the empty Poisson batches
        the training loop skips, and a round that fails halfway.
        """
        device = next(model.parameters()).device
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.policy.accountant)
        engine.accountant = self.accountant
        mode = self.grad_sample_mode(model)
        private_loader = DataLoader(loader.dataset, batch_size=loader.batch_size,
                                    collate_fn=loader.collate_fn,
                                    generator=_os_seeded_generator(torch.device("cpu")))
        if len(private_loader) != self.plan.batches_per_epoch:
            raise ValueError(f"privacy plan made for {self.plan.num_examples} examples, but the "
                             f"loader holds {len(loader.dataset)}")
        model.train()  # Opacus validates the mode; from_pretrained returns eval mode
        per_group = self.policy.head_clip_share > 0
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
            data_loader=private_loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=(self.group_clip_bounds(model, optimizer) if per_group
                           else self.policy.max_grad_norm),
            clipping="per_layer" if per_group else "flat", poisson_sampling=True,
            grad_sample_mode=mode, wrap_model=False,
            noise_generator=_os_seeded_generator(device),
        )
        hooks, dp_optimizer, *criterion, dp_loader = wrapped
        try:
            yield dp_optimizer, (criterion[0] if criterion else None), dp_loader
        finally:
            hooks.cleanup()


MAX_NOISE_MULTIPLIER = 1e6
CALIBRATION_TOLERANCE = 0.01  # in ε, as Opacus' get_noise_multiplier


def calibrate_noise(target_epsilon: float, delta: float, plan: LocalPlan, accountant: str,
                    where: str, prior: list | tuple = ()) -> float:
    """The smallest noise multiplier (within 0.01 in ε) whose planned steps, composed
    after the ``prior`` releases, cost at most ``target_epsilon`` at ``delta``.

    Opacus' ``get_noise_multiplier`` bisects over a run alone; this is the same bisection
    over the run composed with what comes before it (the site's history, its noisy count).
    Raises ConfigError naming the setting that makes this impossible.
    """
    if delta >= 1 / plan.num_examples:
        raise ConfigError(
            f"'dp-delta' {delta:g} must be below 1/n = {1 / plan.num_examples:g} for {where} "
            f"n = {plan.num_examples} examples (δ = 1/n allows revealing an example outright)")
    meter = create_accountant(accountant)

    def epsilon(sigma: float) -> float:
        meter.history = [*prior, (sigma, plan.sample_rate, plan.total_steps)]
        return float(meter.get_epsilon(delta=delta))

    low, high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"'dp-target-epsilon' {target_epsilon:g} is too small for even one step of "
                f"DP-SGD with {where} {plan.num_examples} examples: no noise multiplier up to "
                f"{MAX_NOISE_MULTIPLIER:g} reaches it over the {plan.total_steps} planned steps"
                + (f" after the {len(prior)} earlier release(s)" if prior else ""))
        eps_high = epsilon(high)
    while target_epsilon - eps_high > CALIBRATION_TOLERANCE:
        middle = (low + high) / 2
        eps = epsilon(middle)
        if eps < target_epsilon:
            high, eps_high = middle, eps
        else:
            low = middle
    return high


def check_run_settings(settings: DPSGDConfig, cfg: RunConfig, num_train_examples: int) -> None:
    """Server start-up: settings that no client can satisfy stop the run here.

    Checked against the whole training set, the most favourable case (every client holds a
    share, so a smaller n and a larger sampling rate); each client checks again with its own
    share and refuses with ``invalid-setting`` if they fail there.
    """
    if not settings.dp_sgd:
        return
    plan = LocalPlan(num_train_examples, cfg.batch_size, cfg.local_epochs, cfg.num_server_rounds)
    try:
        calibrate_noise(settings.dp_target_epsilon, settings.dp_delta, plan,
                        settings.dp_accountant, where="the run's training set of")
    except ConfigError as err:
        raise ConfigError(f"run config {err}") from err


@contextlib.contextmanager
def _account(context: Context, cfg: RunConfig, policy: EffectivePrivacy,
             ledger: PrivacyLedger) -> Iterator[Account]:
    """The account a round is charged to, locked while the block runs.

    With ``dp-state-dir``: the site's lifetime ledger, the only source of truth
    (``context.state`` keeps a copy for reading only). Without: ``context.state``, which
    lives as long as one Flower run. A resumed run starts with an empty
    ``context.state``, so such a site cannot know what it spent before the interruption:
    it refuses rather than count from zero.
    """
    if policy.state_dir:
        dataset = _dataset_identity(cfg, NodeData.from_mapping(context.node_config))
        with SiteLedger(Path(policy.state_dir)).account(dataset) as account:
            yield account
        context.state[STATE_KEY] = _account_record(account)
        return
    if STATE_KEY in context.state:
        account = _read_account_record(context.state[STATE_KEY])
    elif ledger.resumed:
        raise PrivacyRefusal(Refusal(LEDGER_UNAVAILABLE, (
            f"run '{ledger.name}' was resumed at round {ledger.resumed_at_round} as a new "
            "Flower run, and this site keeps its privacy accountant only in the interrupted "
            "run's memory (context.state); the ε it spent there is unknown, so it does not "
            "train rather than count from zero. Set node config 'dp-state-dir' to keep a "
            "lifetime ledger on disk")))
    else:
        account = Account(history=[])
    yield account
    context.state[STATE_KEY] = _account_record(account)


def _dataset_identity(cfg: RunConfig, node: NodeData) -> DatasetIdentity:
    """The site's own data folder, or in simulation its partition of the run's dataset."""
    if node.data_path:
        return DatasetIdentity.of_folder(Path(node.data_path))
    return DatasetIdentity.of_folder(
        Path(cfg.dataset), partition=f"partition {node.partition_id} of {node.num_partitions}")


def _account_record(account: Account) -> ConfigRecord:
    return ConfigRecord({"account": json.dumps({
        "history": account.history, "dp-sgd-steps": account.dp_sgd_steps,
        "count-releases": account.count_releases,
        "noise-multipliers": account.noise_multipliers, "counts": account.counts})})


def _read_account_record(record: ConfigRecord) -> Account:
    try:
        saved = json.loads(str(record["account"]))
        return Account(history=[tuple(e) for e in saved["history"]],
                       dp_sgd_steps=int(saved["dp-sgd-steps"]),
                       count_releases=int(saved["count-releases"]),
                       noise_multipliers={k: float(v) for k, v in
                                          saved["noise-multipliers"].items()},
                       counts={k: int(v) for k, v in saved["counts"].items()})
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"this node's context.state '{STATE_KEY}' is not a privacy account "
                          f"({err}); refusing to train rather than count from zero") from err


def _noisy_count(num_examples: int, noise_multiplier: float) -> int:
    """``max(1, round(n + N(0, s^2)))`` from OS randomness: a Gaussian mechanism of
    sensitivity 1 (one example more or less) that the server cannot reproduce."""
    noise = np.random.default_rng(secrets.randbits(128)).normal(0.0, noise_multiplier)
    return max(1, round(num_examples + noise))


def _os_seeded_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))
