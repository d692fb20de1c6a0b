"""Privacy settings: the run's (chosen by whoever starts the run) and the site's (chosen by
the institution that runs a SuperNode).

Run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):
    :class:`DPSGDSettings`       sample-level DP-SGD on every client (Opacus)
    :class:`UserLevelDPSettings` user-level DP on the aggregate (Flower's central-DP wrappers)
Node config (``flower-supernode --node-config``):
    :class:`SitePolicy`          the institution's limits, which a run can only tighten

A site's limits always win: the effective settings of a client are the stricter of the
run's and the site's (smaller ε budget, smaller δ, more noise, DP forced on).
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


@dataclasses.dataclass(frozen=True)
class DPSGDSettings:
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
    def from_run_config(cls, values: Mapping[str, Any]) -> DPSGDSettings:
        return parse_section(cls, values)

    def validate(self) -> None:
        require(math.isfinite(self.dp_target_epsilon) and self.dp_target_epsilon > 0,
                "dp-target-epsilon", f"must be a finite number > 0 (the privacy budget ε), "
                f"got {self.dp_target_epsilon}")
        require(0 < self.dp_delta < 1, "dp-delta",
                f"must be in (0, 1) (and below 1/number of examples), got {self.dp_delta}")
        require(self.dp_max_grad_norm > 0, "dp-max-grad-norm",
                f"must be > 0 (per-example gradients are clipped to it), "
                f"got {self.dp_max_grad_norm}")
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

    ``dp-max-epsilon``          cap on this site's cumulative ε in a run (0 = no cap): a round
                                that would pass it is refused, so the cap is never exceeded;
                                a cap implies DP-SGD on this site
    ``dp-delta``                this site's δ (0 = the run's); the smaller of the two is used
    ``dp-force``                train under DP-SGD even when the run does not ask for it
    ``dp-min-noise-multiplier`` floor on the DP-SGD noise multiplier (0 = none)
    ``dp-state-dir``            a folder where the client also keeps its accountant, one file
                                per privacy ledger, so that a SuperNode restarted mid-run or
                                a resumed run (fresh context.state) goes on counting from
                                what it spent (empty = context.state only; such a site does
                                not train in a resumed run)
    """

    CONFIG_SOURCE: ClassVar[str] = "node config"

    dp_max_epsilon: float = dataclasses.field(default=0.0, metadata={
        "help": "Cap on this site's cumulative epsilon in a run (0 = no cap); a round that would "
                "pass it is refused, and a cap turns DP-SGD on."})
    dp_delta: float = dataclasses.field(default=0.0, metadata={
        "help": "This site's delta (0 = the run's); the smaller of the two is used."})
    dp_force: bool = dataclasses.field(default=False, metadata={
        "help": "Train under DP-SGD even when the run does not ask for it."})
    dp_min_noise_multiplier: float = dataclasses.field(default=0.0, metadata={
        "help": "Floor on the DP-SGD noise multiplier (0 = none)."})
    dp_state_dir: str = dataclasses.field(default="", metadata={
        "help": "Folder where the site keeps its privacy accountant across SuperNode restarts and "
                "resumed runs (empty = in memory only; such a site does not train in a resumed "
                "run)."})

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
        require(math.isfinite(self.dp_max_epsilon) and self.dp_max_epsilon >= 0, "dp-max-epsilon",
                f"must be a finite number > 0 (0 = no cap), got {self.dp_max_epsilon}")
        require(0 <= self.dp_delta < 1, "dp-delta",
                f"must be in (0, 1) (0 = the run's δ), got {self.dp_delta}")
        require(math.isfinite(self.dp_min_noise_multiplier) and self.dp_min_noise_multiplier >= 0,
                "dp-min-noise-multiplier", f"must be >= 0, got {self.dp_min_noise_multiplier}")

    def tightened_by(self, other: SitePolicy) -> SitePolicy:
        """The stricter of two policies, limit by limit."""
        return SitePolicy(
            dp_max_epsilon=_smallest_set(self.dp_max_epsilon, other.dp_max_epsilon),
            dp_delta=_smallest_set(self.dp_delta, other.dp_delta),
            dp_force=self.dp_force or other.dp_force,
            dp_min_noise_multiplier=max(self.dp_min_noise_multiplier,
                                        other.dp_min_noise_multiplier),
            dp_state_dir=self.dp_state_dir or other.dp_state_dir,
        )


def site_policy(node_config: Mapping[str, Any], run: DPSGDSettings) -> SitePolicy:
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

    @classmethod
    def combine(cls, run: DPSGDSettings, site: SitePolicy) -> EffectivePrivacy | None:
        """None when neither the run nor the site asks for DP-SGD.

        A site with a budget (``dp-max-epsilon``) or ``dp-force`` trains under DP-SGD even
        in a run without it (training without DP would spend an unbounded ε), calibrated to
        its own budget or, without one, to the run's ``dp-target-epsilon``."""
        if not (run.dp_sgd or site.dp_force or site.dp_max_epsilon > 0):
            return None
        target = run.dp_target_epsilon
        if not run.dp_sgd and site.dp_max_epsilon > 0:
            target = site.dp_max_epsilon
        return cls(
            target_epsilon=target,
            delta=_smallest_set(run.dp_delta, site.dp_delta),
            max_epsilon=site.dp_max_epsilon or None,
            min_noise_multiplier=site.dp_min_noise_multiplier,
            max_grad_norm=run.dp_max_grad_norm,
            accountant=run.dp_accountant,
            grad_sample_mode=run.dp_grad_sample_mode,
            state_dir=site.dp_state_dir,
            head_clip_share=run.dp_head_clip_share,
        )


@dataclasses.dataclass(frozen=True)
class UserLevelDPSettings:
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
    def from_run_config(cls, values: Mapping[str, Any]) -> UserLevelDPSettings:
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
        require(self.user_dp_clipping_norm > 0, "user-dp-clipping-norm",
                f"must be > 0, got {self.user_dp_clipping_norm}")
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
