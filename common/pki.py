"""Certificates for the embedded defaults: a self-signed CA and a serving or client certificate signed by it.

Used by the relay (its gRPC endpoint) and by the client proxy (its local HTTPS endpoint for kubectl, and
the client certificate that kubectl must present there).
Private keys are written with mode 600 and never leave the machine that made them.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clusterconnect.errors import StartupError

CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=365)


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(common_name: str) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_ec_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Our CAs' keys are EC keys (create_ca): anything else in the file is refused, not signed with."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StartupError("a CA key in the data directory is not an EC private key")
    return key


def issue_server_cert(ca: KeyPair, hosts: list[str], *, client_auth: bool = False) -> KeyPair:
    """A serving certificate for ``hosts``; with ``client_auth`` it may also authenticate as a client
    (relay replicas use one certificate of the relay-peer CA for both ends of a peer stream)."""
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])]
    return _issue_leaf(ca, hosts[0], usages, _subject_alt_names(hosts))


def issue_client_cert(ca: KeyPair, common_name: str) -> KeyPair:
    """A certificate that authenticates a client only (no serving, no names to serve)."""
    return _issue_leaf(ca, common_name, [ExtendedKeyUsageOID.CLIENT_AUTH], [])


def _issue_leaf(
    ca: KeyPair, common_name: str, usages: list[x509.ObjectIdentifier], names: list[x509.GeneralName]
) -> KeyPair:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = _load_ec_key(ca.key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LEAF_LIFETIME)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = (
        builder
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _ensure_ca(ca_crt: Path, ca_key: Path, ca_name: str) -> tuple[KeyPair, bool]:
    """The CA in ``ca_crt``/``ca_key``, created if either is missing; True if it was just created."""
    if ca_crt.exists() and ca_key.exists():
        return KeyPair(ca_crt.read_bytes(), ca_key.read_bytes()), False
    ca = create_ca(ca_name)
    write_private(ca_key, ca.key_pem)
    ca_crt.write_bytes(ca.cert_pem)
    return ca, True


def ensure_ca_and_server_cert(directory: Path, ca_name: str, hosts: list[str]) -> tuple[Path, Path, Path]:
    """Load ``ca.crt``/``tls.crt``/``tls.key`` from ``directory``, creating what is missing.

    The serving certificate is re-issued when it does not cover every host in ``hosts``.
    Returns (ca_cert, tls_cert, tls_key) paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_crt = directory / "ca.crt"
    ca, _ = _ensure_ca(ca_crt, directory / "ca.key", ca_name)
    tls_crt, tls_key = ensure_server_cert(directory, ca, hosts)
    return ca_crt, tls_crt, tls_key


def ensure_server_cert(directory: Path, ca: KeyPair, hosts: list[str]) -> tuple[Path, Path]:
    """``tls.crt``/``tls.key`` in ``directory``, issued by ``ca`` for ``hosts``: kept when they are (and
    are fresh), issued again otherwise (a new CA, another host). Returns (tls_cert, tls_key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    tls_crt, tls_key = directory / "tls.crt", directory / "tls.key"
    if not (tls_crt.exists() and tls_key.exists() and _issued_by(tls_crt.read_bytes(), ca)
            and _covers(tls_crt.read_bytes(), hosts)):
        leaf = issue_server_cert(ca, hosts)
        write_private(tls_key, leaf.key_pem)
        tls_crt.write_bytes(leaf.cert_pem)
    return tls_crt, tls_key


def _issued_by(cert_pem: bytes, ca: KeyPair) -> bool:
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure_ca_and_client_cert(directory: Path, ca_name: str, common_name: str) -> tuple[Path, Path, Path]:
    """Load ``client-ca.crt``/``client.crt``/``client.key`` from ``directory``, creating what is missing.

    The client certificate is re-issued when its CA is new or it expires within 30 days.
    Returns (client_ca_cert, client_cert, client_key) paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_crt = directory / "client-ca.crt"
    client_crt, client_key = directory / "client.crt", directory / "client.key"
    ca, created = _ensure_ca(ca_crt, directory / "client-ca.key", ca_name)
    if created or not (client_crt.exists() and client_key.exists() and _fresh(client_crt.read_bytes())):
        leaf = issue_client_cert(ca, common_name)
        write_private(client_key, leaf.key_pem)
        client_crt.write_bytes(leaf.cert_pem)
    return ca_crt, client_crt, client_key


def _fresh(cert_pem: bytes) -> bool:
    """Valid for 30 more days at least (a certificate is renewed well before kubectl would refuse it)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc >= _now() + datetime.timedelta(days=30)


def _covers(cert_pem: bytes, hosts: list[str]) -> bool:
    if not _fresh(cert_pem):
        return False
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(str(ipaddress.ip_address(h)) in present if _is_ip(h) else h in present for h in hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def ca_hash(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo, as kubeadm pins a CA."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()
