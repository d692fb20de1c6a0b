"""One client's sample-level DP-SGD for a whole run, with Opacus.

Like Opacus' ``PrivacyEngine``, one object owns the privacy state: the noise multiplier
(calibrated once, at the client's first round) and one accountant for the entire run. In
deployment every round runs in a fresh ClientApp process, so the state travels in the
node's ``context.state`` (:meth:`ClientPrivacy.save`/:meth:`ClientPrivacy.for_node`) and,
with the node config's ``dp-state-dir``, in a file named after the run's privacy ledger
(``sepal/privacy/ledger.py``), which outlives a SuperNode restart and a resumed run.

Planned steps: Opacus' Poisson loader draws ``ceil(N / B)`` batches per epoch, each example
with probability ``q = 1 / ceil(N / B)``; the run plans ``T = rounds x local-epochs x
ceil(N / B)`` steps, and the noise multiplier ``sigma`` is the smallest for which T steps
of the sampled Gaussian mechanism cost at most the target ε at δ
(``opacus.accountants.utils.get_noise_multiplier``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

from sepal.config import ConfigError, RunConfig
from sepal.optim import HEAD_MARKER
from sepal.privacy.config import DPSGDSettings, EffectivePrivacy, site_policy
from sepal.privacy.ledger import PrivacyLedger
from sepal.privacy.refusal import (
    BUDGET_EXHAUSTED,
    INVALID_SETTING,
    LEDGER_UNAVAILABLE,
    PrivacyRefusal,
    Refusal,
)

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
    def steps_per_round(self) -> int:
        return self.local_epochs * self.batches_per_epoch

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round


class ClientPrivacy:
    """Sample-level DP of one client: calibration, accounting, budget, Opacus wrapping."""

    def __init__(self, policy: EffectivePrivacy, plan: LocalPlan, noise_multiplier: float,
                 history: list | tuple = (), state_file: Path | None = None):
        self.policy = policy
        self.plan = plan
        self.noise_multiplier = noise_multiplier
        self.accountant = create_accountant(policy.accountant)
        self.accountant.history = [tuple(entry) for entry in history]
        self.state_file = state_file  # the ledger's file in dp-state-dir; None = memory only

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def for_node(cls, context: Context, cfg: RunConfig, num_examples: int,
                 train_config: Mapping[str, Any]) -> ClientPrivacy | None:
        """This node's DP-SGD for the round, or None when neither run nor site asks for it.

        Continues the accountant of the privacy ledger the server names in
        ``train_config``, with its noise multiplier (never recalibrated, even when a
        resumed run has more rounds). Raises :class:`PrivacyRefusal` when the site must
        not train: impossible settings, a round that would take ε past the site's
        ``dp-max-epsilon``, or a ledger whose spent ε this site cannot know.
        """
        try:
            run = DPSGDSettings.from_run_config(context.run_config)
            policy = EffectivePrivacy.combine(run, site_policy(context.node_config, run))
            if policy is None:
                return None
            ledger = PrivacyLedger.from_train_config(train_config)
            plan = LocalPlan(num_examples, cfg.batch_size, cfg.local_epochs, cfg.num_server_rounds)
            state_file = (Path(policy.state_dir).expanduser() / ledger.file_name()
                          if policy.state_dir else None)
            record = _saved_record(context, ledger, state_file)
            privacy = (cls.from_record(policy, plan, record, state_file) if record is not None
                       else cls.calibrated(policy, plan, state_file))
        except ConfigError as err:
            raise PrivacyRefusal(Refusal(INVALID_SETTING, str(err))) from err
        privacy.check_budget()
        return privacy

    @classmethod
    def calibrated(cls, policy: EffectivePrivacy, plan: LocalPlan,
                   state_file: Path | None = None) -> ClientPrivacy:
        """Start of the ledger: the noise multiplier for the whole planned run (raises
        ConfigError naming the setting that makes it impossible on this site)."""
        sigma = calibrate_noise(policy.target_epsilon, policy.delta, plan, policy.accountant,
                                where="this site's")
        return cls(policy, plan, max(sigma, policy.min_noise_multiplier), state_file=state_file)

    @classmethod
    def from_record(cls, policy: EffectivePrivacy, plan: LocalPlan, record: ConfigRecord,
                    state_file: Path | None = None) -> ClientPrivacy:
        if record.get("accountant") != policy.accountant:
            raise ConfigError(
                f"run config 'dp-accountant' is {policy.accountant!r} but this node's saved "
                f"privacy state was accounted with {record.get('accountant')!r}")
        # a site that raised its noise floor mid-run gets it from the next round on
        sigma = max(float(record["noise-multiplier"]), policy.min_noise_multiplier)
        return cls(policy, plan, sigma, json.loads(str(record["history"])), state_file)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "accountant": self.policy.accountant,
            "noise-multiplier": self.noise_multiplier,
            "history": json.dumps(self.accountant.history),
        })

    def save(self, context: Context) -> None:
        """Into the node's context.state and, with ``dp-state-dir``, onto disk."""
        record = self.to_record()
        context.state[STATE_KEY] = record
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(dict(record)), encoding="utf-8")
            os.replace(tmp, self.state_file)

    # -- accounting ---------------------------------------------------------------------

    @property
    def steps_taken(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        return self._epsilon(self.accountant.history)

    def projected_epsilon(self, steps: int) -> float:
        """ε after ``steps`` more steps at the current noise and sampling rate."""
        return self._epsilon(self.accountant.history
                             + [(self.noise_multiplier, self.plan.sample_rate, steps)])

    def _epsilon(self, history: list) -> float:
        if not history:
            return 0.0
        accountant = create_accountant(self.policy.accountant)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=self.policy.delta))

    def check_budget(self) -> None:
        """Refuse a round that would take ε past the site's cap, before any step is taken."""
        cap = self.policy.max_epsilon
        if cap is None:
            return
        steps = self.plan.steps_per_round
        projected = self.projected_epsilon(steps)
        if projected <= cap:
            return
        if self.steps_taken == 0:
            refusal = Refusal(INVALID_SETTING, (
                f"node config 'dp-max-epsilon' {cap:g} is below the ε of a single round here "
                f"({projected:.4f} at δ={self.policy.delta:g} for {steps} steps at noise "
                f"multiplier {self.noise_multiplier:.4f}); this site can never train"))
        else:
            refusal = Refusal(BUDGET_EXHAUSTED, (
                f"spent ε={self.epsilon():.4f} of node config 'dp-max-epsilon' {cap:g} at "
                f"δ={self.policy.delta:g}; the next round ({steps} steps) would reach "
                f"ε={projected:.4f}"))
        raise PrivacyRefusal(refusal, self.report())

    def report(self) -> ConfigRecord:
        """What the client tells the server: its cumulative spending."""
        return ConfigRecord({
            "epsilon": self.epsilon(),
            "delta": self.policy.delta,
            "max-epsilon": self.policy.max_epsilon or 0.0,
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.plan.sample_rate,
            "steps": self.steps_taken,
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
        steps_before = self.steps_taken
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
            for _ in range(self.plan.steps_per_round - (self.steps_taken - steps_before)):
                self.accountant.step(noise_multiplier=self.noise_multiplier,
                                     sample_rate=dp_loader.sample_rate)


def calibrate_noise(target_epsilon: float, delta: float, plan: LocalPlan, accountant: str,
                    where: str) -> float:
    """The smallest noise multiplier whose planned steps cost at most ``target_epsilon``.

    Raises ConfigError naming the setting that makes this impossible.
    """
    if delta >= 1 / plan.num_examples:
        raise ConfigError(
            f"'dp-delta' {delta:g} must be below 1/n = {1 / plan.num_examples:g} for {where} "
            f"n = {plan.num_examples} examples (δ = 1/n allows revealing an example outright)")
    try:
        return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                    sample_rate=plan.sample_rate, steps=plan.total_steps,
                                    accountant=accountant)
    except ValueError as err:
        raise ConfigError(
            f"'dp-target-epsilon' {target_epsilon:g} is too small for even one step of DP-SGD "
            f"with {where} {plan.num_examples} examples: no noise multiplier up to 1e6 "
            f"reaches it over the {plan.total_steps} planned steps ({err})") from err


def check_run_settings(settings: DPSGDSettings, cfg: RunConfig, num_train_examples: int) -> None:
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


def _saved_record(context: Context, ledger: PrivacyLedger,
                  state_file: Path | None) -> ConfigRecord | None:
    """The ledger's saved accountant; None when this site has not trained in it yet.

    ``context.state`` holds it from the Flower run's earlier rounds, the site's
    ``dp-state-dir`` across SuperNode restarts and resumed runs. A resumed run starts with
    an empty ``context.state``, so without a state dir the site cannot know what it spent
    before the interruption: it refuses rather than count from zero.
    """
    if STATE_KEY in context.state:
        return context.state[STATE_KEY]
    if state_file is not None:
        return _read_state_file(state_file)
    if ledger.resumed:
        raise PrivacyRefusal(Refusal(LEDGER_UNAVAILABLE, (
            f"run '{ledger.name}' was resumed at round {ledger.resumed_at_round} as a new "
            "Flower run, and this site keeps its privacy accountant only in the interrupted "
            "run's memory (context.state); the ε it spent there is unknown, so it does not "
            "train rather than count from zero. Set node config 'dp-state-dir' before a run "
            "starts to keep the accountant on disk across resumes")))
    return None


def _read_state_file(path: Path) -> ConfigRecord | None:
    if not path.exists():
        return None
    try:
        return ConfigRecord(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"node config 'dp-state-dir': {path} is not a readable privacy "
                          f"state ({err}); refusing to train rather than count from zero") from err


def _os_seeded_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))
