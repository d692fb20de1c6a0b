"""The privacy ledger: which accounting a round's ε is charged to.

A site's DP-SGD accountant follows the run as the federation knows it, not the Flower
run: a run resumed from a checkpoint is a new Flower run (new run id, empty
``context.state``) but trains the same model on the same data, so its ε must continue
the interrupted run's. The server names the ledger in every train config with the run's
``run-name`` (the identity checkpoints use) and, in a resumed run, the round it resumed
at. A site keeps its accountant under that name; it trusts only its own disk for the ε
already spent, never a number from the server.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from sepal.privacy.refusal import LEDGER_UNAVAILABLE, PrivacyRefusal, Refusal

LEDGER_KEY = "privacy-ledger"
RESUMED_AT_KEY = "resumed-at-round"
_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME_CHARS = 200  # "ledger-" + name + ".json" stays below the usual 255-byte limit


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

    def file_name(self) -> str:
        """``ledger-<run-name>.json``, with every character outside ``A-Za-z0-9._-``
        replaced by ``_`` and at most 200 of them kept. Names that then coincide share a
        file, which over-counts ε but never under-counts it."""
        safe = _UNSAFE_IN_FILE_NAME.sub("_", self.name)[:_MAX_NAME_CHARS]
        return f"ledger-{safe}.json"
