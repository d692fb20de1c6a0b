"""Privacy settings: the run's (chosen by whoever starts the run) and the site's (chosen by
the institution that runs a SuperNode).

Run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):
    :class:`DPSGDConfig`       sample-level DP-SGD on every client (Opacus)
    :class:`UserLevelDPConfig` user-level DP on the aggregate (Flower's central-DP wrappers)
Node config (``flower-supernode --node-config``):
    :class:`SitePolicy`          the institution's limits, which a run can only tighten

A site's limits always win: the effective settings of a client are the stricter of the
run's and the site's (smaller ε, smaller δ, more noise, DP forced on). A site with a budget
owns its ε and δ: the run can only tighten them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from flwr.common.config import parse_config_args

from sepal.config import ConfigError, parse_section, require

ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks")
# policy-like node config keys without the dp- prefix: refused rather than ignored
UNPREFIXED = ("max-epsilon", "epsilon", "delta", "force-dp", "min-noise-multiplier")
USER_DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
# above this, a "privacy budget" promises nothing (e^100): a typo or a bypass, never a policy
MAX_EPSILON = 100.0
SAMPLE_NEIGHBOURS = "add/remove one training example of the site"


@dataclasses.dataclass(frozen=True)
class DPSGDConfig:
    """Sample-level DP-SGD, run side.

    ``dp-target-epsilon`` is the ε each client reaches at ``dp-delta`` after the whole planned
    run (every round, every local epoch); the noise multiplier is calibrated once from it.
    ``dp-simulated-site-policy`` gives simulated SuperNodes (which only get partition-id and
    num-partitions as node config) a site policy: ``"0: dp-max-epsilon=2; 2: dp-force=true"``.
    It can only tighten a node's own policy, so a server cannot use it to loosen a real site's.
    """

    dp_sgd: bool = dataclasses.field(default=False, metadata={
        "help": "Train every site with sample-level DP-SGD (Opacus)."})
    dp_target_epsilon: float = dataclasses.field(default=8.0, metadata={
        "help": "The epsilon each site reaches at `dp-delta` after the whole planned run; the noise"
                " multiplier is calibrated once from it."})
    dp_delta: float = dataclasses.field(default=1e-5, metadata={
        "help": "Delta of the sample-level guarantee; must be below 1 / a site's number of "
                "examples."})
    dp_max_grad_norm: float = dataclasses.field(default=1.0, metadata={
        "help": "Per-example gradients are clipped to this L2 norm."})
    dp_accountant: str = dataclasses.field(default="rdp", metadata={
        "help": "Opacus accountant: `rdp` or `prv`."})
    dp_grad_sample_mode: str = dataclasses.field(default="auto", metadata={
        "help": "How per-example gradients are computed: `ghost` clipping, `hooks`, or `auto` "
                "(hooks when under a tenth of the parameters train)."})
    dp_head_clip_share: float = dataclasses.field(default=0.0, metadata={"help": (
        "Clip the classifier head and the body (encoder or LoRA adapters) separately: the "
        "head's per-example gradient to C*sqrt(share), the body's to C*sqrt(1 - share), "
        "each group's bound spread evenly over its tensors (Opacus per-layer clipping), so "
        "the total sensitivity stays dp-max-grad-norm C. A freshly initialized head's "
        "gradient is about ten times the adapters' and would otherwise take the whole "
        "bound. 0 = one flat bound over all trainable parameters.")})
    dp_simulated_site_policy: str = dataclasses.field(default="", metadata={
        "help": "Site policies for simulated sites by partition id, e.g. "
                "`\"0: dp-max-epsilon=2; 2: dp-force=true\"`; it only tightens a site's own "
                "policy."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DPSGDConfig:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(0 < self.dp_target_epsilon <= MAX_EPSILON, "dp-target-epsilon",
                f"must be a number in (0, {MAX_EPSILON:g}] (the privacy budget ε), "
                f"got {self.dp_target_epsilon}")
        require(0 < self.dp_delta < 1, "dp-delta",
                f"must be in (0, 1) (and below 1/number of examples), got {self.dp_delta}")
        require(math.isfinite(self.dp_max_grad_norm) and self.dp_max_grad_norm > 0,
                "dp-max-grad-norm", f"must be a finite number > 0 (per-example gradients are "
                f"clipped to it), got {self.dp_max_grad_norm}")
        require(self.dp_accountant in ACCOUNTANTS, "dp-accountant",
                f"must be one of {ACCOUNTANTS} (Opacus accountants), got {self.dp_accountant!r}")
        require(self.dp_grad_sample_mode in GRAD_SAMPLE_MODES, "dp-grad-sample-mode",
                f"must be one of {GRAD_SAMPLE_MODES}, got {self.dp_grad_sample_mode!r}")
        require(0.0 <= self.dp_head_clip_share < 1.0, "dp-head-clip-share",
                f"must be in [0, 1) (0 = flat clipping), got {self.dp_head_clip_share}")
        require(not (self.dp_head_clip_share > 0 and self.dp_grad_sample_mode == "ghost"),
                "dp-head-clip-share", "needs per-sample gradients: Opacus ghost clipping "
                "only clips flat; set dp-grad-sample-mode to 'auto' or 'hooks'")
        self.simulated_site_policies()

    def simulated_site_policies(self) -> dict[int, SitePolicy]:
        """Partition id -> site policy, from ``dp-simulated-site-policy``."""
        key = "dp-simulated-site-policy"
        policies: dict[int, SitePolicy] = {}
        entries = (part.strip() for part in self.dp_simulated_site_policy.split(";"))
        for entry in filter(None, entries):
            partition, sep, settings = entry.partition(":")
            require(bool(sep) and partition.strip().isdigit(), key,
                    f"entry {entry!r} must look like 'PARTITION-ID: key=value key=value'")
            try:
                values = parse_config_args([settings.strip()]) if settings.strip() else {}
            except ValueError as err:
                raise ConfigError(f"run config '{key}' entry {entry!r}: {err}") from err
            unknown = set(values) - SitePolicy.keys()
            require(not unknown, key, f"entry {entry!r} has unknown keys {sorted(unknown)} "
                    f"(a site policy takes {sorted(SitePolicy.keys())})")
            policies[int(partition)] = SitePolicy.from_mapping(values, source=f"run config '{key}'")
        return policies


@dataclasses.dataclass(frozen=True)
class SitePolicy:
    """An institution's privacy policy, from its SuperNode's node config.

    ``dp-max-epsilon``            lifetime cap on the ε of this site's data, over every run
                                  (0 = no cap, at most 100): a round that would pass it is
                                  refused; a cap implies DP-SGD and needs ``dp-state-dir``
    ``dp-delta``                  this site's δ (0 = the run's, or with a cap the smaller of
                                  1e-5 and 1/(10 n)); the smaller of run's and site's is used
    ``dp-force``                  train under DP-SGD even when the run does not ask for it;
                                  needs the site's own ``dp-max-epsilon``
    ``dp-min-noise-multiplier``   floor on the DP-SGD noise multiplier (0 = none)
    ``dp-count-noise-multiplier`` std of the Gaussian noise on the example count a DP site
                                  sends in place of its exact count (sensitivity 1)
    ``dp-state-dir``              the folder of the site's lifetime privacy ledger
                                  (``privacy-ledger.json``), shared by every run on its data
                                  (empty = context.state only, for one Flower run; such a
                                  site does not train in a resumed run)
    """

    CONFIG_SOURCE: ClassVar[str] = "node config"

    dp_max_epsilon: float = dataclasses.field(default=0.0, metadata={
        "help": "Lifetime cap on the ε of this site's data over every run (0 = none)."})
    dp_delta: float = dataclasses.field(default=0.0, metadata={
        "help": "This site's δ (0 = the run's, or min(1e-5, 1/(10 n)) with a cap)."})
    dp_force: bool = dataclasses.field(default=False, metadata={
        "help": "Train under DP-SGD even when the run does not ask for it (needs a cap)."})
    dp_min_noise_multiplier: float = dataclasses.field(default=0.0, metadata={
        "help": "Floor on the DP-SGD noise multiplier (0 = none)."})
    dp_count_noise_multiplier: float = dataclasses.field(default=20.0, metadata={
        "help": "Std of the Gaussian noise on the example count a DP site sends."})
    dp_state_dir: str = dataclasses.field(default="", metadata={
        "help": "Folder of the site's lifetime privacy ledger (privacy-ledger.json)."})

    @staticmethod
    def keys() -> set[str]:
        return {field.name.replace("_", "-") for field in dataclasses.fields(SitePolicy)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "node config") -> SitePolicy:
        try:
            return parse_section(cls, values)
        except ConfigError as err:
            raise ConfigError(str(err).replace("run config", source, 1)) from err

    def validate(self) -> None:
        require(0 <= self.dp_max_epsilon <= MAX_EPSILON, "dp-max-epsilon",
                f"must be a number in (0, {MAX_EPSILON:g}] (0 = no cap), got {self.dp_max_epsilon}")
        require(0 <= self.dp_delta < 1, "dp-delta",
                f"must be in (0, 1) (0 = the run's δ), got {self.dp_delta}")
        require(math.isfinite(self.dp_min_noise_multiplier) and self.dp_min_noise_multiplier >= 0,
                "dp-min-noise-multiplier", f"must be >= 0, got {self.dp_min_noise_multiplier}")
        require(math.isfinite(self.dp_count_noise_multiplier)
                and self.dp_count_noise_multiplier >= 1, "dp-count-noise-multiplier",
                f"must be a finite number >= 1 (the std of the noise on the example count), "
                f"got {self.dp_count_noise_multiplier}")

    def tightened_by(self, other: SitePolicy) -> SitePolicy:
        """The stricter of two policies, limit by limit."""
        return SitePolicy(
            dp_max_epsilon=_smallest_set(self.dp_max_epsilon, other.dp_max_epsilon),
            dp_delta=_smallest_set(self.dp_delta, other.dp_delta),
            dp_force=self.dp_force or other.dp_force,
            dp_min_noise_multiplier=max(self.dp_min_noise_multiplier,
                                        other.dp_min_noise_multiplier),
            dp_count_noise_multiplier=max(self.dp_count_noise_multiplier,
                                          other.dp_count_noise_multiplier),
            dp_state_dir=self.dp_state_dir or other.dp_state_dir,
        )


def site_policy(node_config: Mapping[str, Any], run: DPSGDConfig) -> SitePolicy:
    """This node's policy: its node config, tightened by a simulated policy for its partition.

    A ``dp-`` key that is not a policy key, or a policy key without its ``dp-`` prefix, is
    an error: a misspelt cap must not pass silently.
    """
    unknown = sorted(k for k in node_config
                     if (k.startswith("dp-") or k in UNPREFIXED) and k not in SitePolicy.keys())
    if unknown:
        raise ConfigError(f"node config {unknown} not privacy policy keys (a site policy takes "
                          f"{sorted(SitePolicy.keys())})")
    own = SitePolicy.from_mapping({k: v for k, v in node_config.items() if k in SitePolicy.keys()})
    partition = node_config.get("partition-id")
    simulated = run.simulated_site_policies().get(int(partition)) if partition is not None else None
    return own.tightened_by(simulated) if simulated else own


@dataclasses.dataclass(frozen=True)
class EffectivePrivacy:
    """What one client enforces: the run's DP-SGD settings under its site's policy."""

    target_epsilon: float
    delta: float
    max_epsilon: float | None
    min_noise_multiplier: float
    max_grad_norm: float
    accountant: str
    grad_sample_mode: str
    state_dir: str = ""
    head_clip_share: float = 0.0
    count_noise_multiplier: float = SitePolicy.dp_count_noise_multiplier

    @classmethod
    def combine(cls, run: DPSGDConfig, site: SitePolicy,
                num_examples: int) -> EffectivePrivacy | None:
        """None when neither the run nor the site asks for DP-SGD.

        A site with a budget (``dp-max-epsilon``) owns ε and δ: it trains under DP-SGD even
        in a run without it, calibrated to the smaller of its cap and the run's
        ``dp-target-epsilon``, at the smaller of the run's δ and its own (by default
        ``min(1e-5, 1/(10 n))`` for its ``num_examples`` = n). ``dp-force`` needs such a
        budget, and a budget needs ``dp-state-dir``, where the lifetime ledger lives.
        Raises ConfigError naming the node config key otherwise.
        """
        if not (run.dp_sgd or site.dp_force or site.dp_max_epsilon > 0):
            return None
        require(site.dp_max_epsilon > 0 or not site.dp_force, "dp-force",
                "needs this site's own budget 'dp-max-epsilon': with the run's "
                "dp-target-epsilon alone, whoever submits the run would choose the noise",
                source="node config")
        require(not site.dp_max_epsilon or bool(site.dp_state_dir), "dp-max-epsilon",
                f"{site.dp_max_epsilon:g} is a lifetime cap on this site's data and needs "
                "'dp-state-dir', the folder of the site's privacy ledger; without it every "
                "new Flower run would start counting from zero", source="node config")
        target = run.dp_target_epsilon if run.dp_sgd else site.dp_max_epsilon
        delta = _smallest_set(run.dp_delta, site.dp_delta)
        if site.dp_max_epsilon > 0:
            target = min(target, site.dp_max_epsilon)
            if not site.dp_delta:
                delta = min(delta, default_site_delta(num_examples))
        return cls(
            target_epsilon=target,
            delta=delta,
            max_epsilon=site.dp_max_epsilon or None,
            min_noise_multiplier=site.dp_min_noise_multiplier,
            max_grad_norm=run.dp_max_grad_norm,
            accountant=run.dp_accountant,
            grad_sample_mode=run.dp_grad_sample_mode,
            state_dir=site.dp_state_dir,
            head_clip_share=run.dp_head_clip_share,
            count_noise_multiplier=site.dp_count_noise_multiplier,
        )


def default_site_delta(num_examples: int) -> float:
    """δ of a site with a budget and no ``dp-delta``: min(1e-5, 1 / (10 n))."""
    return min(1e-5, 1 / (10 * max(num_examples, 1)))


@dataclasses.dataclass(frozen=True)
class UserLevelDPConfig:
    """User-level (client-level) DP on the aggregate with Flower's central-DP wrappers.

    ``user-dp``: ``off``, or ``{server,client}-{fixed,adaptive}`` = which side clips each
    client's update and whether the clipping norm is fixed or adapted (Andrew et al. 2021).
    Flower's wrappers add Gaussian noise of std ``noise x clipping-norm / sampled clients``
    to the average.
    """

    user_dp: str = dataclasses.field(default="off", metadata={
        "help": "User-level DP on the aggregate: `off`, or `server-fixed`, `client-fixed`, `server-"
                "adaptive`, `client-adaptive` (which side clips, and whether the clipping norm "
                "adapts)."})
    user_dp_noise_multiplier: float = dataclasses.field(default=1.0, metadata={
        "help": "Gaussian noise multiplier of the user-level mechanism (noise std = multiplier x "
                "clipping norm / sampled sites)."})
    user_dp_clipping_norm: float = dataclasses.field(default=1.0, metadata={
        "help": "L2 norm each site's update is clipped to (the initial norm when adaptive)."})
    user_dp_target_quantile: float = dataclasses.field(default=0.5, metadata={
        "help": "Adaptive clipping: fraction of updates the norm aims to leave unclipped."})
    user_dp_clip_norm_lr: float = dataclasses.field(default=0.2, metadata={
        "help": "Adaptive clipping: learning rate of the clipping norm."})
    user_dp_clipped_count_stddev: float = dataclasses.field(default=0.0, metadata={
        "help": "Adaptive clipping: noise on the clipped count (0 = Flower's default, sampled sites"
                " / 20)."})
    user_dp_delta: float = dataclasses.field(default=1e-5, metadata={
        "help": "Delta of the user-level guarantee; must be below 1 / number of sites."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UserLevelDPConfig:
        return parse_section(cls, values)

    @property
    def enabled(self) -> bool:
        return self.user_dp != "off"

    @property
    def adaptive(self) -> bool:
        return self.user_dp.endswith("adaptive")

    @property
    def client_side(self) -> bool:
        return self.user_dp.startswith("client")

    def validate(self) -> None:
        require(self.user_dp in USER_DP_MODES, "user-dp",
                f"must be one of {USER_DP_MODES}, got {self.user_dp!r}")
        if not self.enabled:
            return
        require(self.user_dp_noise_multiplier != 0, "user-dp-noise-multiplier",
                "is 0 while user-dp is on: without noise the aggregate has no privacy")
        require(math.isfinite(self.user_dp_noise_multiplier) and self.user_dp_noise_multiplier > 0,
                "user-dp-noise-multiplier", f"must be > 0, got {self.user_dp_noise_multiplier}")
        require(math.isfinite(self.user_dp_clipping_norm) and self.user_dp_clipping_norm > 0,
                "user-dp-clipping-norm",
                f"must be a finite number > 0, got {self.user_dp_clipping_norm}")
        require(0 <= self.user_dp_target_quantile <= 1, "user-dp-target-quantile",
                f"must be in [0, 1], got {self.user_dp_target_quantile}")
        require(self.user_dp_clip_norm_lr > 0, "user-dp-clip-norm-lr",
                f"must be > 0, got {self.user_dp_clip_norm_lr}")
        require(self.user_dp_clipped_count_stddev >= 0, "user-dp-clipped-count-stddev",
                f"must be >= 0 (0 = Flower's default, sampled clients / 20), "
                f"got {self.user_dp_clipped_count_stddev}")
        require(0 < self.user_dp_delta < 1, "user-dp-delta",
                f"must be in (0, 1) (and below 1/number of clients), got {self.user_dp_delta}")


def _smallest_set(first: float, second: float) -> float:
    """The smaller of two limits where 0 means 'not set'."""
    values = [value for value in (first, second) if value > 0]
    return min(values) if values else 0.0
