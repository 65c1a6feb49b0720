"""Certificates and keys for a federation: one CA, the coordinator's TLS certificate, and
one authentication key pair per hospital.

Layout written under ``out`` (re-running adds what is missing and never replaces a key)::

    ca/ca.key, ca/ca.pem                       the CA: keep ca.key offline after provisioning
    coordinator/ca.pem, server.pem, server.key the SuperLink's TLS identity
    coordinator/registered/<site>.pub          public keys of hospitals allowed to join
    sites/<site>/ca.pem, <site>.key, <site>.pub  hand this folder to that hospital only

Hospital keys are ECDSA P-384 in OpenSSH format, the form Flower's node authentication
expects (Flower 1.41 docs, "Authenticate SuperNodes": ``ssh-keygen -t ecdsa -b 384``).
Private keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from micromil_core.errors import ConfigError
from micromil_core.io import atomic_path

CURVE = ec.SECP384R1()
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOCAL_NAMES = ("localhost", "127.0.0.1")  # the operator's own `flwr` calls go over loopback


@dataclass(frozen=True)
class Provisioned:
    created: list[Path]
    kept: list[Path]


def provision(
    out: str | Path,
    server_names: Sequence[str],
    sites: Sequence[str],
    *,
    days: int = 825,
    renew_server: bool = False,
) -> Provisioned:
    """Create (or complete) the PKI of a federation under ``out``."""
    out = Path(out)
    names = _server_names(server_names)
    for site in sites:
        check_site_name(site)
    created: list[Path] = []
    kept: list[Path] = []

    ca_key_path, ca_cert_path = out / "ca" / "ca.key", out / "ca" / "ca.pem"
    if ca_key_path.is_file() != ca_cert_path.is_file():
        raise ConfigError(
            f"{out / 'ca'} holds only one of ca.key/ca.pem; restore the other from backup "
            "(making a new CA would lock out every provisioned hospital)"
        )
    if ca_key_path.is_file():
        ca_key = _load_private_key(ca_key_path)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        kept += [ca_key_path, ca_cert_path]
    else:
        ca_key = ec.generate_private_key(CURVE)
        ca_cert = _ca_certificate(ca_key, days=3650)
        created += [_write_private(ca_key_path, _pem_key(ca_key)), _write(ca_cert_path, _pem_cert(ca_cert))]

    coord = out / "coordinator"
    ca_pem = _pem_cert(ca_cert)
    _write(coord / "ca.pem", ca_pem)
    server_key_path, server_cert_path = coord / "server.key", coord / "server.pem"
    if renew_server or not server_cert_path.is_file() or not server_key_path.is_file():
        key = ec.generate_private_key(CURVE)
        cert = _server_certificate(key, ca_key, ca_cert, names, days)
        created += [_write_private(server_key_path, _pem_key(key)), _write(server_cert_path, _pem_cert(cert))]
    else:
        kept += [server_key_path, server_cert_path]

    for site in sites:
        folder = out / "sites" / site
        key_path, pub_path = folder / f"{site}.key", folder / f"{site}.pub"
        _write(folder / "ca.pem", ca_pem)
        if key_path.is_file():
            kept.append(key_path)
        else:
            created += make_site_key(folder, site)
        _write(coord / "registered" / f"{site}.pub", pub_path.read_bytes())
    return Provisioned(created, kept)


def make_site_key(folder: str | Path, site: str) -> list[Path]:
    """A hospital's node-authentication key pair: ``<site>.key`` (0600) and ``<site>.pub``.

    A hospital may run this itself and send only the ``.pub`` file to the coordinator.
    """
    check_site_name(site)
    folder = Path(folder)
    key_path, pub_path = folder / f"{site}.key", folder / f"{site}.pub"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists; refusing to replace a hospital's key")
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return [_write_private(key_path, private), _write(pub_path, public + f" {site}\n".encode())]


def check_site_name(site: str) -> None:
    if not SITE_NAME.match(site):
        raise ConfigError(
            f"site name {site!r} is invalid: use letters, digits, '.', '_' or '-' "
            "(it names files and appears in logs)"
        )


def read_public_key(path: Path) -> str:
    """Validate a hospital's public key file: ECDSA P-384, OpenSSH format."""
    text = path.read_text().strip()
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} is not an OpenSSH public key; make one with "
            "`ssh-keygen -t ecdsa -b 384 -N '' -f KEY` or `flower-server provision`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise ConfigError(
            f"{path}: Flower's node authentication needs an ECDSA P-384 key "
            "(`ssh-keygen -t ecdsa -b 384`)"
        )
    return text


def certificate_names(path: Path) -> list[str]:
    """DNS names and IPs a certificate is valid for (for status output and checks)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def _server_names(server_names: Sequence[str]) -> list[str]:
    names = [n.strip() for n in server_names if n.strip()]
    if not names:
        raise ConfigError(
            "give the DNS name(s) or IP address(es) the hospitals will use to reach the "
            "coordinator, e.g. --server-name coordinator.example.org --server-name 10.0.0.5"
        )
    return list(dict.fromkeys([*names, *LOCAL_NAMES]))


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "micromil-fl federation CA")])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[str],
    days: int,
) -> x509.Certificate:
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key made by `flower-server provision`")
    return key


def _write(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _write_private(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(data)
    return path
