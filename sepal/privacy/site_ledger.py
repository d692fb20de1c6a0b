"""A site's lifetime privacy ledger: every DP release on one dataset, over every run.

``<dp-state-dir>/privacy-ledger.json`` is the only record of what a site's data has
spent. It holds, per dataset, the history of Gaussian mechanisms charged to it, in
Opacus' accountant format ``(noise multiplier, sample rate, steps)``, so any Opacus
accountant composes the whole lifetime; the noise multiplier each run calibrated
(keyed by the run's ``run-name``, so that a resumed run keeps it); and each run's noisy
example count (released once per run, then repeated at no further cost).

A dataset is the site's data folder (``data-path``; in simulation the run's dataset and
the node's partition) together with a SHA-256 fingerprint of its files: data found under
a known folder, or with a known fingerprint under another folder, is charged to the
same account, so neither renaming a run, nor a new Flower run, nor copying the data
elsewhere starts a fresh budget.

Every read and charge is one read-modify-write of the file under an exclusive lock
(``filelock``): runs on one site at the same time see each other's steps, and a round is
charged, before it trains, against the ledger as it is at that moment. The file is
replaced atomically (temporary file, then rename).

``ledger-<run-name>.json`` files that an earlier layout kept per run in the same folder
are counted once, into every dataset's account: they name no dataset, so each is
charged to all of them (an over-count, never an under-count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sepal.config import ConfigError

LEDGER_FILE = "privacy-ledger.json"
FORMAT_VERSION = 1
LOCK_TIMEOUT_S = 300.0
LEGACY_PATTERN = "ledger-*.json"


@dataclasses.dataclass(frozen=True)
class DatasetIdentity:
    location: str     # the site's data folder (and partition, in simulation)
    fingerprint: str  # SHA-256 over the names and contents of its files

    @classmethod
    def of_folder(cls, folder: Path, partition: str = "") -> DatasetIdentity:
        """The dataset in ``folder``; ``partition`` names a share of it (simulation)."""
        folder = folder.expanduser().resolve()
        digest = hashlib.sha256()
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with path.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        digest.update(partition.encode())
        location = str(folder) + (f"#{partition}" if partition else "")
        return cls(location, digest.hexdigest())


@dataclasses.dataclass
class Account:
    """One dataset's spending, as read under the ledger's lock."""

    history: list[tuple[float, float, int]]  # every release, lifetime, Opacus format
    dp_sgd_steps: int = 0
    count_releases: int = 0
    noise_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    changed: bool = False

    def charge(self, entries: list[tuple[float, float, int]], dp_sgd_steps: int = 0,
               count_releases: int = 0) -> None:
        self.history.extend(entries)
        self.dp_sgd_steps += dp_sgd_steps
        self.count_releases += count_releases
        self.changed = True

    def remember(self, run: str, noise_multiplier: float | None = None,
                 count: int | None = None) -> None:
        if noise_multiplier is not None:
            self.noise_multipliers[run] = noise_multiplier
        if count is not None:
            self.counts[run] = count
        self.changed = True


class SiteLedger:
    """The lifetime ledger in one ``dp-state-dir``."""

    def __init__(self, state_dir: Path):
        self.folder = state_dir.expanduser()
        self.path = self.folder / LEDGER_FILE

    @contextlib.contextmanager
    def account(self, dataset: DatasetIdentity) -> Iterator[Account]:
        """``dataset``'s account, locked; what the block charges is written when it ends
        without an exception."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S):
                ledger = self._read()
                imported = self._import_legacy(ledger)
                key = _entry_key(ledger, dataset)
                entry = ledger["datasets"].setdefault(key, _empty_entry())
                if dataset.fingerprint not in entry["fingerprints"]:
                    entry["fingerprints"].append(dataset.fingerprint)
                    imported = True
                unattributed = ledger["unattributed"]
                account = Account(
                    history=[tuple(e) for e in unattributed["history"] + entry["history"]],
                    dp_sgd_steps=unattributed["dp-sgd-steps"] + entry["dp-sgd-steps"],
                    count_releases=entry["count-releases"],
                    noise_multipliers=dict(entry["noise-multipliers"]),
                    counts=dict(entry["counts"]))
                yield account
                if not (account.changed or imported):
                    return
                own = len(unattributed["history"])
                entry["history"] = [list(e) for e in account.history[own:]]
                entry["dp-sgd-steps"] = account.dp_sgd_steps - unattributed["dp-sgd-steps"]
                entry["count-releases"] = account.count_releases
                entry["noise-multipliers"] = account.noise_multipliers
                entry["counts"] = account.counts
                self._write(ledger)
        except Timeout as err:
            raise ConfigError(f"node config 'dp-state-dir': {self.path} stayed locked for "
                              f"{LOCK_TIMEOUT_S:g} s; not training without the ledger") from err

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": FORMAT_VERSION, "datasets": {},
                    "unattributed": {"files": [], "history": [], "dp-sgd-steps": 0}}
        try:
            ledger = json.loads(self.path.read_text(encoding="utf-8"))
            _check_shape(ledger)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"node config 'dp-state-dir': {self.path} is not a readable "
                              f"privacy ledger ({err}); refusing to train rather than count "
                              "from zero") from err
        return ledger

    def _write(self, ledger: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(ledger, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def _import_legacy(self, ledger: dict[str, Any]) -> bool:
        """Count per-run ledger files not counted yet; True when any was."""
        unattributed = ledger["unattributed"]
        new = sorted(p for p in self.folder.glob(LEGACY_PATTERN)
                     if p.name not in unattributed["files"])
        for path in new:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                history = [tuple(e) for e in json.loads(str(record["history"]))]
                steps = sum(int(s) for _, _, s in history)
            except (OSError, ValueError, TypeError, KeyError) as err:
                raise ConfigError(f"node config 'dp-state-dir': {path} is not a readable "
                                  f"privacy state ({err}); refusing to train rather than "
                                  "leave it uncounted") from err
            unattributed["history"].extend([list(e) for e in history])
            unattributed["dp-sgd-steps"] += steps
            unattributed["files"].append(path.name)
        return bool(new)


def _empty_entry() -> dict[str, Any]:
    return {"fingerprints": [], "history": [], "dp-sgd-steps": 0, "count-releases": 0,
            "noise-multipliers": {}, "counts": {}}


def _entry_key(ledger: dict[str, Any], dataset: DatasetIdentity) -> str:
    """The account of the same folder, else of the same data under another folder."""
    datasets = ledger["datasets"]
    if dataset.location in datasets:
        return dataset.location
    for key, entry in datasets.items():
        if dataset.fingerprint in entry["fingerprints"]:
            return key
    return dataset.location


def _check_shape(ledger: Any) -> None:
    if not isinstance(ledger, dict) or ledger.get("version") != FORMAT_VERSION:
        raise ValueError(f"expected a version-{FORMAT_VERSION} ledger object")
    for entry in [ledger["unattributed"], *ledger["datasets"].values()]:
        for sigma, rate, steps in entry["history"]:
            if not (float(sigma) >= 0 and 0 < float(rate) <= 1 and int(steps) >= 1):
                raise ValueError(f"history entry {[sigma, rate, steps]} is not a release")
