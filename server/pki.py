"""The federation's keys and certificates, made with ``cryptography``.

Flower ships no certificate tooling (its examples call openssl from shell scripts), so
the certificate profile Flower's TLS and SuperNode authentication need is set here.

Three kinds of material, all EC P-384:

- a CA (self-signed, path length 0) that signs only the SuperLink's certificate;
- the SuperLink's TLS certificate: serverAuth, one SAN per DNS name / IP address the
  SuperNodes dial, plus ``localhost`` and ``127.0.0.1`` because the SuperLink's own
  SuperExec and ServerApp reach it on the loopback address over the same TLS port;
- one SuperNode authentication key pair per institution, in the OpenSSH formats
  Flower reads (``flower-supernode --auth-supernode-private-key`` loads an OpenSSH
  private key; ``flwr supernode register`` an OpenSSH public key on a NIST curve).

Private keys are created with ``O_CREAT | O_EXCL`` and mode 0600, so an existing key
is never overwritten, not even in a race.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


class KeyExistsError(FileExistsError):
    """A private key file is already there; it is never overwritten."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, openssh: bool = False) -> None:
    """Write ``key`` unencrypted with mode 0600; refuse if ``path`` exists."""
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise KeyExistsError(f"{path} exists; private keys are never overwritten") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # the umask may only have narrowed it; make it exact


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = path.read_bytes()
    if b"OPENSSH PRIVATE KEY" in data:
        key = serialization.load_ssh_private_key(data, None)
    else:
        key = serialization.load_pem_private_key(data, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def openssh_public_key(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    return line + b" " + comment.encode() + b"\n"


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def issue_ca(key: ec.EllipticCurvePrivateKey, name: str, days: int,
             now: datetime.datetime | None = None) -> x509.Certificate:
    now = now or _now()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def issue_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                             key: ec.EllipticCurvePrivateKey, hosts: list[str],
                             not_before: datetime.datetime, not_after: datetime.datetime,
                             ) -> x509.Certificate:
    """The SuperLink's TLS certificate for ``hosts`` (DNS names or IP addresses)."""
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def server_certificate_for(ca_key, ca_cert, key, hosts: list[str], days: int,
                           now: datetime.datetime | None = None) -> x509.Certificate:
    now = now or _now()
    return issue_server_certificate(ca_key, ca_cert, key, hosts,
                                    now - datetime.timedelta(minutes=5),
                                    now + datetime.timedelta(days=days))


def subject_alternative_names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _general_name(host: str) -> x509.GeneralName:
    if is_ip_address(host):
        return x509.IPAddress(ipaddress.ip_address(host))
    return x509.DNSName(host)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
