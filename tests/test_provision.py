"""sepal-provision: the federation's keys, certificates and commands, checked with the
libraries that will read them (cryptography, OpenSSL via ssl, Flower's own loaders)."""

from __future__ import annotations

import datetime
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from sepal.secagg.identity import SitePolicy
from server import pki
from server.provision import FederationSpec, ProvisionError, main, provision

DESCRIPTION = """
name = "sepal-demo"
superlink = "fl.example.org:9093"
hosts = ["10.0.0.5", "fl-backup.example.org"]

[node-defaults]
dp-max-epsilon = 4.0

[institutions.hospital-a]
data-path = "/srv/sepal/data"

[institutions.clinic-b]
device = "cuda:0"
"""


def _provisioned(tmp_path: Path, text: str = DESCRIPTION) -> tuple[Path, FederationSpec]:
    (tmp_path / "federation.toml").write_text(text)
    spec = FederationSpec.from_toml(tmp_path / "federation.toml")
    provision(spec, tmp_path / "fed")
    return tmp_path / "fed", spec


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_superlink_certificate_is_signed_by_the_ca_for_every_address(tmp_path):
    fed, _ = _provisioned(tmp_path)
    ca = pki.load_certificate(fed / "ca" / "ca.pem")
    cert = pki.load_certificate(fed / "operator" / "superlink.pem")

    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "fl.example.org", "fl-backup.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.5", "127.0.0.1"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # OpenSSL accepts the pair as a server identity and the CA as a trust root
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(fed / "operator" / "superlink.pem", fed / "operator" / "superlink.key")
    ssl.create_default_context(cafile=str(fed / "institutions" / "clinic-b" / "ca.pem"))


def test_private_keys_are_owner_only_and_in_the_formats_flower_reads(tmp_path):
    fed, _ = _provisioned(tmp_path)
    for key in [fed / "ca" / "ca.key", fed / "operator" / "superlink.key",
                *fed.glob("institutions/*/supernode-auth.key")]:
        assert _mode(key) == 0o600, key
        assert _mode(key.parent) == 0o700, key.parent
    assert _mode(fed) == 0o700
    for name in ("hospital-a", "clinic-b"):
        folder = fed / "institutions" / name
        private = pki.load_private_key(folder / "supernode-auth.key")
        assert isinstance(private.curve, ec.SECP384R1)
        assert (folder / "supernode-auth.key").read_bytes().startswith(
            b"-----BEGIN OPENSSH PRIVATE KEY-----")
        # what `flwr supernode register` does with the public key the operator gets
        registered = try_load_public_key(fed / "operator" / "public-keys" / f"{name}.pub")
        assert registered == try_load_public_key(folder / "supernode-auth.pub")
        assert (folder / "supernode-auth.pub").read_text().endswith(f"{name}@sepal-demo\n")
    keys = {(fed / f"institutions/{n}/supernode-auth.pub").read_text()
            for n in ("hospital-a", "clinic-b")}
    assert len(keys) == 2


def test_each_institution_gets_its_node_config_and_exact_command(tmp_path):
    fed, _ = _provisioned(tmp_path)
    folder = fed / "institutions" / "hospital-a"
    config = parse_config_args([str(folder / "node-config.toml")])  # how flower-supernode reads it
    assert config == {"data-path": "/srv/sepal/data", "device": "auto", "dp-max-epsilon": 4.0,
                      "dp-delta": 1e-5, "dp-state-dir": "/var/lib/sepal/dp-state",
                      "secagg-identity": str(folder / "secagg-identity.key"),
                      "secagg-roster": str(folder / "secagg-roster.toml")}
    # the identity signs; every institution's roster pins the same verification keys
    identity = SitePolicy.from_mapping(config).identity()
    assert identity.name == "hospital-a" and _mode(folder / "secagg-identity.key") == 0o600
    rosters = {(fed / f"institutions/{n}/secagg-roster.toml").read_text()
               for n in ("hospital-a", "clinic-b")}
    assert rosters == {(fed / "operator" / "secagg-roster.toml").read_text()}
    assert set(identity.roster.keys) == {"hospital-a", "clinic-b"}
    assert parse_config_args([str(fed / "institutions/clinic-b/node-config.toml")])["device"] \
        == "cuda:0"

    script = (folder / "start-supernode.sh").read_text()
    for line in ["exec sepal-supernode", "--superlink fl.example.org:9093",
                 '--root-certificates "$HERE/ca.pem"',
                 '--auth-supernode-private-key "$HERE/supernode-auth.key"',
                 '--node-config "$HERE/node-config.toml"']:
        assert line in script
    assert "--insecure" not in script
    superlink = (fed / "operator" / "start-superlink.sh").read_text()
    for line in ["exec sepal-superlink", "--port 9093", "--enable-supernode-auth",
                 '--ssl-certfile "$HERE/superlink.pem"', '--ssl-keyfile "$HERE/superlink.key"',
                 '--ssl-ca-certfile "$HERE/ca.pem"', '--database "$HERE/superlink-state.db"',
                 "--disable-runtime-dependency-installation"]:
        assert line in superlink
    register = (fed / "operator" / "register-institutions.sh").read_text()
    assert 'flwr supernode register "$HERE/public-keys/clinic-b.pub" sepal-demo' in register
    connection = (fed / "operator" / "flwr-home" / "config.toml").read_text()
    assert f'root-certificates = "{fed / "operator" / "ca.pem"}"' in connection
    for path in [folder / "start-supernode.sh", fed / "operator" / "start-superlink.sh",
                 fed / "operator" / "register-institutions.sh"]:
        subprocess.run(["bash", "-n", str(path)], check=True)
        assert _mode(path) == 0o755


def test_rerun_keeps_every_key_and_adds_only_new_institutions(tmp_path):
    fed, _ = _provisioned(tmp_path)
    keys = {p: p.read_bytes() for p in fed.rglob("*.key")}
    certs = {p: p.read_bytes() for p in fed.rglob("*.pem")}
    edited = fed / "institutions" / "hospital-a" / "node-config.toml"
    edited.write_text(edited.read_text().replace("/srv/sepal/data", "/data/here"))

    (tmp_path / "federation.toml").write_text(
        DESCRIPTION.replace("[institutions.clinic-b]", "[institutions.lab-c]\n"
                            "[institutions.clinic-b]"))
    spec = FederationSpec.from_toml(tmp_path / "federation.toml")
    report = provision(spec, fed)

    assert report.created == ["lab-c"] and sorted(report.kept) == ["clinic-b", "hospital-a"]
    assert not report.new_ca
    assert all(path.read_bytes() == data for path, data in keys.items())
    assert all(path.read_bytes() == data for path, data in certs.items())
    assert "/data/here" in edited.read_text()  # an institution's edits survive
    assert (fed / "institutions" / "lab-c" / "supernode-auth.key").exists()
    assert "lab-c.pub" in (fed / "operator" / "register-institutions.sh").read_text()
    # the sites already provisioned get the grown roster (their own key unchanged)
    assert "lab-c = " in (fed / "institutions" / "hospital-a" / "secagg-roster.toml").read_text()

    # an institution dropped from the description is left alone and reported
    report = provision(FederationSpec.from_mapping(
        {"name": "sepal-demo", "superlink": "fl.example.org:9093",
         "hosts": ["10.0.0.5", "fl-backup.example.org"], "institutions": {"lab-c": {}}}), fed)
    assert report.not_in_description == ["clinic-b", "hospital-a"]


def test_rerun_refuses_other_superlink_names_instead_of_reissuing(tmp_path):
    fed, _ = _provisioned(tmp_path)
    changed = DESCRIPTION.replace("fl.example.org:9093", "new.example.org:9093")
    (tmp_path / "federation.toml").write_text(changed)
    with pytest.raises(ProvisionError, match=r"superlink\.pem is for .* but the description "
                                             r"asks for .*new\.example\.org"):
        provision(FederationSpec.from_toml(tmp_path / "federation.toml"), fed)


def test_a_private_key_is_never_overwritten(tmp_path):
    key = tmp_path / "some.key"
    pki.write_private_key(key, pki.new_key())
    before = key.read_bytes()
    with pytest.raises(pki.KeyExistsError, match="never overwritten"):
        pki.write_private_key(key, pki.new_key())
    assert key.read_bytes() == before


@pytest.mark.parametrize("text, key", [
    ('superlink = "a:1"\n[institutions.x]\n', "'name'"),
    ('name = "f"\nsuperlink = "no-port"\n[institutions.x]\n', "'superlink'"),
    ('name = "f"\nsuperlink = "h:70000"\n[institutions.x]\n', "'superlink'"),
    ('name = "f"\nsuperlink = "h:1"\n', "'institutions'"),
    ('name = "f"\nsuperlink = "h:1"\n[institutions."Bad Name"]\n', "institutions.Bad Name"),
    ('name = "f"\nsuperlink = "h:1"\nport = 3\n[institutions.x]\n', "'port' is not a known key"),
    ('name = "f"\nsuperlink = "h:1"\ncert-days = 0\n[institutions.x]\n', "'cert-days'"),
    ('name = "f"\nsuperlink = "h:1"\n[institutions.x]\ndp-max-epsilon = [1]\n',
     "institutions.x.dp-max-epsilon"),
])
def test_bad_descriptions_name_the_key(tmp_path, text, key):
    path = tmp_path / "federation.toml"
    path.write_text(text)
    with pytest.raises(ProvisionError, match=key.replace(".", r"\.").replace("'", "'")):
        FederationSpec.from_toml(path)


def test_cli_reports_what_it_did_and_fails_cleanly(tmp_path, capsys):
    (tmp_path / "federation.toml").write_text(DESCRIPTION)
    assert main([str(tmp_path / "federation.toml"), "--out", str(tmp_path / "fed")]) == 0
    out = capsys.readouterr().out
    assert "added     hospital-a" in out and "new CA" in out
    assert main([str(tmp_path / "federation.toml"), "--out", str(tmp_path / "fed")]) == 0
    assert "kept      clinic-b: keys unchanged" in capsys.readouterr().out
    (tmp_path / "bad.toml").write_text('name = "x"\n')
    assert main([str(tmp_path / "bad.toml"), "--out", str(tmp_path / "fed2")]) == 2
    assert "'superlink'" in capsys.readouterr().err


def test_reprovisioning_over_an_expired_certificate_fails_clearly(tmp_path):
    fed, spec = _provisioned(tmp_path)
    ca_key = pki.load_private_key(fed / "ca" / "ca.key")
    ca_cert = pki.load_certificate(fed / "ca" / "ca.pem")
    key = pki.load_private_key(fed / "operator" / "superlink.key")
    past = pki._now() - datetime.timedelta(days=30)
    expired = pki.server_certificate_for(ca_key, ca_cert, key, spec.certificate_hosts, 1,
                                         now=past)
    (fed / "operator" / "superlink.pem").write_bytes(pki.certificate_pem(expired))
    with pytest.raises(ProvisionError, match=r"superlink\.pem expired on .*re-issue"):
        provision(spec, fed)
    assert main([str(tmp_path / "federation.toml"), "--out", str(fed)]) != 0


def test_reprovisioning_over_a_world_readable_key_fails_clearly(tmp_path):
    fed, spec = _provisioned(tmp_path)
    (fed / "operator" / "superlink.key").chmod(0o644)
    with pytest.raises(ProvisionError, match=r"superlink\.key is readable by others \(mode "
                                             r"0644\)"):
        provision(spec, fed)


@pytest.mark.parametrize("address", ["bad host:9093", "-x.example.org:9093", "a..b:9093",
                                     "exa_mple.org:9093"])
def test_an_invalid_host_name_is_refused(tmp_path, address):
    text = DESCRIPTION.replace("fl.example.org:9093", address)
    (tmp_path / "federation.toml").write_text(text)
    with pytest.raises(ProvisionError, match="'superlink' host .* is not a DNS name"):
        FederationSpec.from_toml(tmp_path / "federation.toml")
