"""``sepal-provision federation.toml --out DIR``: keys, certificates and commands for a federation.

Written here: Flower has no provisioning tool; keys and certificates come from
``cryptography`` (``server/pki.py``), TOML from ``tomli-w``.

The description names the federation, the address the institutions dial and the
institutions (see docs/deployment.md)::

    name = "sepal-demo"
    superlink = "fl.example.org:9093"          # host:port every SuperNode dials
    hosts = ["10.0.0.5"]                       # more DNS names / IPs for the certificate
    [node-defaults]                            # node config every institution starts from
    dp-max-epsilon = 8.0
    [institutions.hospital-a]                  # one table per institution (may be empty)
    data-path = "/srv/sepal/data"

and DIR receives::

    federation.toml                 the description as provisioned
    ca/ca.key ca/ca.pem             the CA (keep ca.key offline; it signs nothing else)
    operator/                       what the SuperLink host needs
        ca.pem superlink.pem superlink.key
        public-keys/<institution>.pub
        secagg-roster.toml          every institution's secure-aggregation verification key
        flwr-home/config.toml       the `flwr` connection to this SuperLink (TLS)
        start-superlink.sh          TLS, SuperNode auth, --database, no runtime installs
        register-institutions.sh    `flwr supernode register` for every institution
    institutions/<name>/            what one institution needs (send it the folder)
        ca.pem supernode-auth.key supernode-auth.pub node-config.toml start-supernode.sh
        secagg-identity.key         its Ed25519 key: signs its secure-aggregation round keys
        secagg-roster.toml          the roster it pins (rewritten when institutions join)

Re-running never touches an existing private key: the CA, the SuperLink key and the
institutions already provisioned are kept as they are and only new institutions are
added (so an institution can join a running federation). A description that no longer
matches the SuperLink certificate (other host names) is refused rather than silently
re-issued. Scripts and the connection file hold no secrets and are rewritten each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from sepal.secagg.identity import (
    IDENTITY_FILE,
    ROSTER_FILE,
    Roster,
    load_signing_key,
    new_signing_key,
    verification_key,
    write_signing_key,
)
from server import pki

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_NODE_CONFIG: dict[str, Any] = {
    "data-path": "",
    "device": "auto",
    "dp-max-epsilon": 8.0,
    "dp-delta": 1e-5,
    "dp-state-dir": "/var/lib/sepal/dp-state",
}
NODE_CONFIG_COMMENTS = {
    "data-path": "folder with this institution's train.csv / test.csv and label_names.json",
    "device": "auto, cpu or cuda[:N]",
    "dp-max-epsilon": "this site's privacy budget: the most epsilon its data will spend over "
                      "every run (DP-SGD on; 0 = no cap; needs dp-state-dir)",
    "dp-delta": "the delta of that budget (0 = min(1e-5, 1/(10 n)) with a cap)",
    "dp-state-dir": "a durable folder, kept and backed up, for this site's lifetime privacy "
                    "ledger (privacy-ledger.json); deleting it forgets what the data spent",
    "secagg-identity": "this institution's secure-aggregation signing key and the roster of "
                       "everyone's verification keys (absolute paths as provisioned: update "
                       "them if this folder moves)",
}
AUTH_KEY = "supernode-auth.key"
AUTH_PUB = "supernode-auth.pub"


DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class ProvisionError(ValueError):
    """The federation description is invalid or conflicts with what DIR holds."""


@dataclasses.dataclass(frozen=True)
class Institution:
    name: str
    node_config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FederationSpec:
    name: str
    superlink_host: str
    superlink_port: int
    hosts: tuple[str, ...]
    listen_host: str
    cert_days: int
    ca_days: int
    institutions: tuple[Institution, ...]

    @property
    def superlink(self) -> str:
        host = f"[{self.superlink_host}]" if ":" in self.superlink_host else self.superlink_host
        return f"{host}:{self.superlink_port}"

    @property
    def certificate_hosts(self) -> list[str]:
        return list(dict.fromkeys([self.superlink_host, *self.hosts, *pki.LOOPBACK_NAMES]))

    @classmethod
    def from_toml(cls, path: Path) -> FederationSpec:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ProvisionError(f"{path}: {err}") from err
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "description") -> FederationSpec:
        def fail(key: str, why: str) -> ProvisionError:
            return ProvisionError(f"{source}: '{key}' {why}")

        known = {"name", "superlink", "hosts", "listen-host", "cert-days", "ca-days",
                 "node-defaults", "institutions"}
        for key in data:
            if key not in known:
                raise fail(key, f"is not a known key (known: {', '.join(sorted(known))})")
        name = data.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise fail("name", "must be lower-case letters, digits, '-' or '_' (at most 63)")
        host, port = _split_address(data.get("superlink"), fail)
        if not _valid_host(host):
            raise fail("superlink", f"host {host!r} is not a DNS name or an IP address")
        hosts = data.get("hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
            raise fail("hosts", "must be a list of DNS names or IP addresses")
        for extra in hosts:
            if not _valid_host(extra):
                raise fail("hosts", f"{extra!r} is not a DNS name or an IP address")
        days = {}
        for key, default in (("cert-days", 365), ("ca-days", 3650)):
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(key, f"must be a positive number of days, got {value!r}")
            days[key] = value
        if days["cert-days"] > days["ca-days"]:
            raise fail("cert-days", "must not exceed ca-days")
        defaults = {**DEFAULT_NODE_CONFIG, **_node_config(data.get("node-defaults", {}),
                                                          "node-defaults", fail)}
        tables = data.get("institutions")
        if not isinstance(tables, dict) or not tables:
            raise fail("institutions", "needs at least one [institutions.<name>] table")
        institutions = []
        for inst_name, table in tables.items():
            if not NAME_PATTERN.match(inst_name):
                raise fail(f"institutions.{inst_name}",
                           "name must be lower-case letters, digits, '-' or '_' (at most 63)")
            config = _node_config(table, f"institutions.{inst_name}", fail)
            institutions.append(Institution(inst_name, {**defaults, **config}))
        listen = data.get("listen-host", "0.0.0.0")
        if not isinstance(listen, str) or not listen:
            raise fail("listen-host", "must be the address the SuperLink binds, e.g. 0.0.0.0")
        return cls(name, host, port, tuple(hosts), listen, days["cert-days"], days["ca-days"],
                   tuple(institutions))


@dataclasses.dataclass
class ProvisionReport:
    created: list[str] = dataclasses.field(default_factory=list)  # institutions added now
    kept: list[str] = dataclasses.field(default_factory=list)     # already provisioned
    not_in_description: list[str] = dataclasses.field(default_factory=list)
    new_ca: bool = False


def provision(spec: FederationSpec, out: Path) -> ProvisionReport:
    """Create (or extend) the federation's folder ``out``; see the module docstring."""
    out = out.resolve()
    report = ProvisionReport()
    _private_dir(out)
    ca_key, ca_cert, report.new_ca = _ensure_ca(spec, out / "ca")
    operator = out / "operator"
    _private_dir(operator)
    _ensure_superlink_certificate(spec, operator, ca_key, ca_cert)
    _write_public(operator / "ca.pem", pki.certificate_pem(ca_cert))
    public_keys = operator / "public-keys"
    public_keys.mkdir(exist_ok=True)

    institutions_dir = out / "institutions"
    institutions_dir.mkdir(exist_ok=True)
    roster = {}
    for institution in spec.institutions:
        folder = institutions_dir / institution.name
        existed = (folder / AUTH_KEY).exists()
        _ensure_institution(spec, institution, folder, ca_cert)
        _write_public(public_keys / f"{institution.name}.pub", (folder / AUTH_PUB).read_bytes())
        roster[institution.name] = _ensure_signing_key(folder / IDENTITY_FILE)
        (report.kept if existed else report.created).append(institution.name)
    roster_text = Roster(roster).to_toml(spec.name).encode()
    _write_public(operator / ROSTER_FILE, roster_text)
    for institution in spec.institutions:
        _write_public(institutions_dir / institution.name / ROSTER_FILE, roster_text)
    described = {i.name for i in spec.institutions}
    report.not_in_description = sorted(
        p.name for p in institutions_dir.iterdir() if p.is_dir() and p.name not in described)

    _write_operator_files(spec, operator)
    _write_public(out / "federation.toml", _spec_toml(spec).encode())
    return report


def superlink_command(spec: FederationSpec, operator: Path) -> list[str]:
    return [
        "sepal-superlink",
        "--host", spec.listen_host, "--port", str(spec.superlink_port),
        "--ssl-ca-certfile", str(operator / "ca.pem"),
        "--ssl-certfile", str(operator / "superlink.pem"),
        "--ssl-keyfile", str(operator / "superlink.key"),
        "--enable-supernode-auth",
        "--database", str(operator / "superlink-state.db"),
        "--disable-runtime-dependency-installation",
    ]


def supernode_command(spec: FederationSpec, folder: Path) -> list[str]:
    return [
        "sepal-supernode",
        "--superlink", spec.superlink,
        "--root-certificates", str(folder / "ca.pem"),
        "--auth-supernode-private-key", str(folder / AUTH_KEY),
        "--node-config", str(folder / "node-config.toml"),
        "--host", "127.0.0.1", "--port", "9094",
    ]


def _ensure_ca(spec: FederationSpec, folder: Path):
    _private_dir(folder)
    key_path, cert_path = folder / "ca.key", folder / "ca.pem"
    if key_path.exists():
        if not cert_path.exists():
            raise ProvisionError(f"{key_path} exists without {cert_path}; restore it from backup")
        ca_key, ca_cert = _load_key(key_path), pki.load_certificate(cert_path)
        if ca_cert.public_key() != ca_key.public_key():
            raise ProvisionError(f"{cert_path} does not belong to {key_path}")
        _check_not_expired(ca_cert, cert_path, f"move {folder} away to start a new CA (every "
                                               "institution then needs its new ca.pem)")
        return ca_key, ca_cert, False
    ca_key = pki.new_key()
    ca_cert = pki.issue_ca(ca_key, spec.name, spec.ca_days)
    pki.write_private_key(key_path, ca_key)
    _write_public(cert_path, pki.certificate_pem(ca_cert))
    return ca_key, ca_cert, True


def _ensure_superlink_certificate(spec, operator: Path, ca_key, ca_cert) -> None:
    key_path, cert_path = operator / "superlink.key", operator / "superlink.pem"
    wanted = set(spec.certificate_hosts)
    if key_path.exists() and cert_path.exists():
        cert = pki.load_certificate(cert_path)
        have = pki.subject_alternative_names(cert)
        if have != wanted:
            raise ProvisionError(
                f"{cert_path} is for {sorted(have)} but the description asks for "
                f"{sorted(wanted)}; to re-issue it, move {key_path} and {cert_path} away "
                "and run again")
        if cert.issuer != ca_cert.subject:
            raise ProvisionError(f"{cert_path} was not issued by {operator.parent}/ca/ca.pem")
        _load_key(key_path)
        _check_not_expired(cert, cert_path, f"move {cert_path} away and run again to re-issue it")
        return
    if cert_path.exists() and not key_path.exists():
        raise ProvisionError(f"{cert_path} exists without {key_path}; move it away to re-issue")
    key = _load_key(key_path) if key_path.exists() else pki.new_key()
    if not key_path.exists():
        pki.write_private_key(key_path, key)
    cert = pki.server_certificate_for(ca_key, ca_cert, key, spec.certificate_hosts,
                                      spec.cert_days)
    _write_public(cert_path, pki.certificate_pem(cert))


def _ensure_institution(spec: FederationSpec, institution: Institution, folder: Path,
                        ca_cert) -> None:
    _private_dir(folder)
    key_path = folder / AUTH_KEY
    if key_path.exists():
        key = _load_key(key_path)
    else:
        key = pki.new_key()
        pki.write_private_key(key_path, key, openssh=True)
    _write_public(folder / AUTH_PUB,
                  pki.openssh_public_key(key, f"{institution.name}@{spec.name}"))
    _write_public(folder / "ca.pem", pki.certificate_pem(ca_cert))
    if not (folder / "node-config.toml").exists():
        _write_public(folder / "node-config.toml", _node_config_toml(spec, institution, folder).encode())
    _write_script(folder / "start-supernode.sh",
                  f"SuperNode of {institution.name} in federation {spec.name}. Options given to "
                  "this script are added (e.g. --port 9095 for a second SuperNode on one host).",
                  _relative(supernode_command(spec, folder), folder))


def _ensure_signing_key(path: Path) -> bytes:
    """The verification key of the Ed25519 key at ``path``, created if absent."""
    if not path.exists():
        write_signing_key(path, new_signing_key())
    return verification_key(load_signing_key(path))


def _write_operator_files(spec: FederationSpec, operator: Path) -> None:
    flwr_home = operator / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    address = f"127.0.0.1:{spec.superlink_port}"
    _write_public(flwr_home / "config.toml", tomli_w.dumps({"superlink": {
        "default": spec.name,
        spec.name: {"address": address, "root-certificates": str(operator / "ca.pem")},
    }}).encode())
    _write_script(operator / "start-superlink.sh",
                  f"SuperLink of federation {spec.name}: TLS, only registered SuperNodes, state "
                  "in superlink-state.db, no runtime dependency installation.",
                  _relative(superlink_command(spec, operator), operator))
    lines = [
        "#!/usr/bin/env bash",
        f"# Register every institution's public key with the running SuperLink of {spec.name}.",
        "# A key registered before is reported as such and the others still go on.",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'export FLWR_HOME="${FLWR_HOME:-$HERE/flwr-home}"',
        "status=0",
    ]
    for institution in spec.institutions:
        lines.append(
            f'flwr supernode register "$HERE/public-keys/{institution.name}.pub" {spec.name} '
            f"--name {shlex.quote(institution.name)} || status=1")
    lines.append("exit $status")
    _write_public(operator / "register-institutions.sh", ("\n".join(lines) + "\n").encode(),
                  mode=0o755)


def _relative(command: list[str], folder: Path) -> list[str]:
    """Paths inside ``folder`` become "$HERE/..." so the folder can be moved to its host."""
    prefix = str(folder) + os.sep
    return ['"$HERE/' + arg[len(prefix):] + '"' if arg.startswith(prefix) else shlex.quote(arg)
            for arg in command]


def _write_script(path: Path, comment: str, command: list[str]) -> None:
    lines = [command[0]]
    for arg in command[1:]:
        if lines[-1].lstrip().startswith("--") and " " not in lines[-1].strip() \
                and not arg.startswith("--"):
            lines[-1] += " " + arg
        else:
            lines.append("    " + arg)
    text = "\n".join([
        "#!/usr/bin/env bash",
        f"# {comment}",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        "exec " + " \\\n".join([*lines, '    "$@"']),
    ]) + "\n"
    _write_public(path, text.encode(), mode=0o755)


def _node_config_toml(spec: FederationSpec, institution: Institution, folder: Path) -> str:
    values = dict(institution.node_config)
    if "secagg-identity" not in values:
        values["secagg-identity"] = str(folder / IDENTITY_FILE)
        values["secagg-roster"] = str(folder / ROSTER_FILE)
    lines = [f"# Node config of {institution.name} in federation {spec.name}.",
             "# Read by flower-supernode --node-config; the ClientApp sees these keys."]
    for key, value in values.items():
        if key in NODE_CONFIG_COMMENTS:
            lines.append(f"# {NODE_CONFIG_COMMENTS[key]}")
        lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _spec_toml(spec: FederationSpec) -> str:
    return tomli_w.dumps({
        "name": spec.name, "superlink": spec.superlink, "hosts": list(spec.hosts),
        "listen-host": spec.listen_host, "cert-days": spec.cert_days, "ca-days": spec.ca_days,
        "institutions": {institution.name: dict(institution.node_config)
                         for institution in spec.institutions},
    })


def _node_config(table: Any, where: str, fail) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise fail(where, "must be a table of node-config keys")
    for key, value in table.items():
        if not isinstance(value, (str, int, float, bool)):
            raise fail(f"{where}.{key}", f"must be a string, number or boolean, got {value!r}")
    return dict(table)


def _load_key(path: Path):
    """A private key this script wrote; refused if others may read it (mode 0644)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ProvisionError(f"{path} is readable by others (mode {mode:04o}): the key may "
                             f"have leaked; if not, chmod 600 it and run again")
    try:
        return pki.load_private_key(path)
    except ValueError as err:
        raise ProvisionError(f"{path}: not a readable private key ({err})") from err


def _check_not_expired(cert, path: Path, remedy: str) -> None:
    expires = cert.not_valid_after_utc
    if expires <= datetime.datetime.now(datetime.timezone.utc):
        raise ProvisionError(f"{path} expired on {expires:%Y-%m-%d %H:%M} UTC; {remedy}")


def _valid_host(host: str) -> bool:
    """An IP address, or a DNS name of letters, digits and '-' labels (RFC 1123)."""
    if pki.is_ip_address(host):
        return True
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(DNS_LABEL.fullmatch(label) for label in labels)


def _split_address(value: Any, fail) -> tuple[str, int]:
    if not isinstance(value, str):
        raise fail("superlink", "must be the 'host:port' the institutions dial")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail("superlink", f"must be 'host:port' with a port in 1..65535, got {value!r}")
    return host, int(port)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_public(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sepal-provision", description=__doc__.split("\n")[0])
    parser.add_argument("description", type=Path, help="federation description (TOML)")
    parser.add_argument("--out", type=Path, required=True, help="the federation's folder")
    args = parser.parse_args(argv)
    try:
        spec = FederationSpec.from_toml(args.description)
        report = provision(spec, args.out)
    except (ValueError, OSError) as err:  # ProvisionError, unreadable or existing key files
        print(f"sepal-provision: {err}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    print(f"federation {spec.name}: SuperLink {spec.superlink} "
          f"({'new CA' if report.new_ca else 'existing CA kept'})")
    for name in report.created:
        print(f"  added     {name}: send {out / 'institutions' / name}/ to that institution")
    for name in report.kept:
        print(f"  kept      {name}: keys unchanged")
        folder = out / "institutions" / name
        if "secagg-identity" not in (folder / "node-config.toml").read_text():
            print(f"            add to its node-config.toml: secagg-identity = "
                  f"\"{folder / IDENTITY_FILE}\", secagg-roster = \"{folder / ROSTER_FILE}\"")
    if report.created and report.kept:
        print("  the roster grew: send secagg-roster.toml to every institution")
    for name in report.not_in_description:
        print(f"  untouched {name}: on disk but not in the description (still registered? "
              f"`flwr supernode unregister` removes it)")
    print(f"next: {out / 'operator' / 'start-superlink.sh'}, then "
          f"{out / 'operator' / 'register-institutions.sh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
