"""Institution identities that authenticate SecAgg+ keys and survivor sets.

Each institution holds a long-term Ed25519 signing key; every site pins the
verification keys of the federation's institutions in a roster. Both are issued by
``sepal-provision`` and named in the site's node config, never in the run config
(which the run's submitter writes)::

    secagg-identity = "/srv/sepal/secagg-identity.key"   # this institution's key (PEM)
    secagg-roster   = "/srv/sepal/secagg-roster.toml"    # everyone's verification keys

A client signs its round keys together with the round (run, round, round id), the
stage and its node id, and later the survivor set the server showed it; a client
seals shares only for neighbours whose keys carry such a signature from an
institution of its roster, and reveals shares only when enough neighbours signed the
same survivor set. The site also sets the floors it accepts for the threshold and
the neighbourhood size (:class:`SitePolicy`).

Roster file::

    [institutions]
    hospital-a = "<base64 of the raw 32-byte Ed25519 verification key>"
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import math
import os
import tomllib
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import tomli_w
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from sepal.config import ConfigError, parse_section, require
from sepal.secagg.errors import SecAggError
from sepal.secagg.graph import as_fraction

SIGNATURE_BYTES = 64
VERIFICATION_KEY_BYTES = 32
STATEMENT_LABEL = b"sepal-secagg/v1/signed/"
IDENTITY_FILE = "secagg-identity.key"
ROSTER_FILE = "secagg-roster.toml"
DEFAULT_MIN_THRESHOLD = 0.667   # read as 2/3 (see ``graph.as_fraction``)
DEFAULT_NEIGHBOUR_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class SitePolicy:
    """What a site accepts in a secure-aggregation round (node config ``secagg-*``).

    ``secagg-min-threshold``: the smallest t / (neighbourhood size) it accepts, > 1/2;
    ``secagg-min-neighbour-factor``: c, the smallest neighbour count it accepts is
    min(n - 1, ceil(c log2 n)) for the n clients announced at setup.
    """

    CONFIG_SOURCE: ClassVar[str] = "node config"

    secagg_identity: str = dataclasses.field(default="", metadata={
        "help": "This institution's secure-aggregation signing key (written by sepal-provision)."})
    secagg_roster: str = dataclasses.field(default="", metadata={
        "help": "The roster of every institution's verification key, pinned at this site."})
    secagg_min_threshold: float = dataclasses.field(default=DEFAULT_MIN_THRESHOLD, metadata={
        "help": "The smallest threshold fraction t / neighbourhood size this site accepts "
                "(above 1/2)."})
    secagg_min_neighbour_factor: float = dataclasses.field(
        default=DEFAULT_NEIGHBOUR_FACTOR, metadata={
            "help": "c: the smallest neighbourhood this site accepts is min(n - 1, "
                    "ceil(c log2 n)) for the n clients announced at setup."})

    @classmethod
    def from_mapping(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        try:
            return parse_section(cls, node_config, source="node config")
        except ConfigError as err:
            raise SecAggError(str(err)) from err

    def validate(self) -> None:
        require(as_fraction(self.secagg_min_threshold) > Fraction(1, 2)
                and self.secagg_min_threshold <= 1, "secagg-min-threshold",
                f"must be a fraction in (1/2, 1], got {self.secagg_min_threshold}: at 1/2 or "
                "below a server that shows clients different survivor sets gets both secrets "
                "of a client", source="node config")
        require(self.secagg_min_neighbour_factor >= 1, "secagg-min-neighbour-factor",
                f"must be >= 1, got {self.secagg_min_neighbour_factor}", source="node config")
        require(bool(self.secagg_identity) == bool(self.secagg_roster), "secagg-identity",
                "and 'secagg-roster' go together (both issued by sepal-provision)",
                source="node config")

    @property
    def authenticated(self) -> bool:
        return bool(self.secagg_identity)

    def min_threshold(self, neighbourhood: int) -> int:
        return max(2, math.ceil(as_fraction(self.secagg_min_threshold) * neighbourhood))

    def min_neighbours(self, clients: int) -> int:
        if clients < 2:
            return 0
        return min(clients - 1,
                   math.ceil(self.secagg_min_neighbour_factor * math.log2(clients)))

    def identity(self) -> Identity:
        return _load_identity(self.secagg_identity, self.secagg_roster,
                              _mtime(self.secagg_identity), _mtime(self.secagg_roster))


@dataclasses.dataclass(frozen=True)
class Roster:
    """Institution name -> raw Ed25519 verification key."""

    keys: dict[str, bytes]

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        try:
            table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("institutions")
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise SecAggError(f"node config 'secagg-roster' {path}: {err}") from None
        if not isinstance(table, dict) or not table:
            raise SecAggError(f"roster {path} has no [institutions] table")
        keys = {}
        for name, encoded in table.items():
            try:
                key = base64.b64decode(encoded, validate=True)
            except (TypeError, ValueError) as err:
                raise SecAggError(f"roster {path}: key of '{name}' is not a base64 Ed25519 "
                                  f"key: {err}") from None
            if len(key) != VERIFICATION_KEY_BYTES:  # OpenSSL checks no more of a raw key
                raise SecAggError(f"roster {path}: key of '{name}' is {len(key)} bytes, not a "
                                  f"{VERIFICATION_KEY_BYTES}-byte Ed25519 key")
            keys[name] = key
        return cls(keys)

    def to_toml(self, federation: str) -> str:
        return (f"# SecAgg roster of federation {federation}: every institution's Ed25519\n"
                "# verification key. Public; every site pins it (node config secagg-roster).\n"
                + tomli_w.dumps({"institutions": {name: base64.b64encode(key).decode()
                                                  for name, key in sorted(self.keys.items())}}))

    def verify(self, node: int, institution: str, signature: bytes, statement: bytes,
               what: str) -> None:
        """Raise SecAggError naming ``node`` unless ``institution`` signed ``statement``."""
        if institution not in self.keys:
            raise SecAggError(f"node {node} presents {what} signed as {institution!r}, an "
                              "institution this site's roster does not know: refused")
        try:
            Ed25519PublicKey.from_public_bytes(self.keys[institution]).verify(signature,
                                                                              statement)
        except (InvalidSignature, TypeError, ValueError):
            raise SecAggError(f"{what} of node {node}: not signed by {institution!r} for this "
                              "round (substituted, forged or replayed); refused") from None


@dataclasses.dataclass(frozen=True)
class Identity:
    """This institution's name in the roster, its signing key and the roster."""

    name: str
    key: Ed25519PrivateKey
    roster: Roster

    def sign(self, statement: bytes) -> bytes:
        return self.key.sign(statement)


def keys_statement(context: bytes, node: int, institution: str, envelope_key: bytes,
                   mask_key: bytes) -> bytes:
    """What a client signs at setup: its two round keys, bound to round, stage and node."""
    return _statement(context, b"setup", node, institution.encode(), envelope_key, mask_key)


def survivors_digest(survivors: list[int]) -> bytes:
    """SHA-256 of a survivor set, computed once for the statements of all its signers."""
    return hashlib.sha256(",".join(map(str, survivors)).encode()).digest()


def survivors_statement(context: bytes, node: int, digest: bytes) -> bytes:
    """What a client signs at the consistency stage: the survivor set it was shown, as
    :func:`survivors_digest`."""
    return _statement(context, b"consistency", node, digest)


def _statement(context: bytes, stage: bytes, node: int, *parts: bytes) -> bytes:
    fields = [context, stage, str(node).encode(), *parts]
    return STATEMENT_LABEL + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def verification_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def write_signing_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` as PKCS#8 PEM readable by its owner only."""
    data = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise SecAggError(f"node config 'secagg-identity' {path}: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"node config 'secagg-identity' {path} is not an Ed25519 key")
    return key


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


@functools.lru_cache(maxsize=64)
def _load_identity(key_path: str, roster_path: str, _key_mtime: int,
                   roster_mtime: int) -> Identity:
    """Loaded once per file version (a SuperNode may run many ClientApps in one process)."""
    key, roster = load_signing_key(key_path), _load_roster(roster_path, roster_mtime)
    public = verification_key(key)
    names = [name for name, pinned in roster.keys.items() if pinned == public]
    if len(names) != 1:
        raise SecAggError(f"node config 'secagg-identity' {key_path}: its verification key is "
                          f"{'not in' if not names else 'listed twice in'} the roster "
                          f"{roster_path}")
    return Identity(names[0], key, roster)


@functools.lru_cache(maxsize=4)
def _load_roster(path: str, _mtime: int) -> Roster:
    """One parse per roster version, shared by the identities of the sites of one host."""
    return Roster.load(path)


def issue_identities(folder: Path, names: list[str],
                     federation: str = "local") -> dict[str, dict[str, str]]:
    """A signing key per name and their roster in ``folder``; name -> its node config.

    For federations whose sites share one host (in-process grids, benchmarks);
    ``sepal-provision`` issues them per institution folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys, configs = {}, {}
    for name in names:
        key = new_signing_key()
        path = folder / f"{name}.key"
        write_signing_key(path, key)
        keys[name] = verification_key(key)
        configs[name] = {"secagg-identity": str(path), "secagg-roster": str(folder / ROSTER_FILE)}
    (folder / ROSTER_FILE).write_text(Roster(keys).to_toml(federation), encoding="utf-8")
    return configs
