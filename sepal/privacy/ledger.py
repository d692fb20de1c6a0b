"""The run a round belongs to, as the server names it in every train config.

A site charges every round to its lifetime ledger on its data
(``sepal/privacy/site_ledger.py``), whatever the run. The run's name (``run-name``, the
identity checkpoints use) only keys what belongs to one run: the noise multiplier it
calibrated at its first round and the noisy example count it released, which a run
resumed from a checkpoint (a new Flower run, empty ``context.state``) continues. In a
resumed run the server also sends the round it resumed at. A name never decides how much
ε a site has left: the server chooses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sepal.privacy.refusal import LEDGER_UNAVAILABLE, PrivacyRefusal, Refusal

LEDGER_KEY = "privacy-ledger"
RESUMED_AT_KEY = "resumed-at-round"


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
    name: str                  # the run's run-name
    resumed_at_round: int = 0  # first round of a resumed run; 0 = not resumed

    @property
    def resumed(self) -> bool:
        return self.resumed_at_round > 0

    def to_config(self) -> dict[str, Any]:
        """The train-config entries the server sends every round."""
        config: dict[str, Any] = {LEDGER_KEY: self.name}
        if self.resumed:
            config[RESUMED_AT_KEY] = self.resumed_at_round
        return config

    @classmethod
    def from_train_config(cls, config: Mapping[str, Any]) -> PrivacyLedger:
        """Raises :class:`PrivacyRefusal` (``ledger-unavailable``) when the server names no
        ledger: without one the client cannot know which spent ε a round adds to."""
        name = config.get(LEDGER_KEY)
        if not isinstance(name, str) or not name:
            raise PrivacyRefusal(Refusal(LEDGER_UNAVAILABLE, (
                f"the train config names no privacy ledger ('{LEDGER_KEY}' is {name!r}), so "
                "the ε this site already spent in the run is unknown; not training rather "
                "than count from zero")))
        return cls(name, int(config.get(RESUMED_AT_KEY, 0)))
