"""The relay's agent CA: checks agents' CSRs and issues client certificates for exactly one cluster.

The agent CA is separate from the CA that signs the relay's serving certificate: the agent port
trusts only the agent CA, and an agent certificate can never pass as the relay's.

A certificate names its cluster twice, in the same way: subject ``CN=cluster:<name>`` and SAN URI
``clusterconnect://cluster/<name>``. The relay reads the cluster from the SAN URI (the CN is for
people reading certificates) and refuses a certificate whose two names disagree.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from clusterconnect import errors
from clusterconnect.agentcert import CN_PREFIX, cluster_of, subject_for, uri_for
from clusterconnect.pki import KeyPair, create_ca
from clusterconnect.relay.storage import shared
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store

ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MAX_CSR_BYTES = 16 * 1024
AGENT_CA_KEY = "pki/agent-ca"


class CsrRefused(errors.PermissionDenied):
    """The CSR asks for something an agent of this cluster may not have."""


class CsrInvalid(errors.InvalidInput):
    """The CSR cannot be parsed or its signature is wrong."""


@dataclass(frozen=True)
class AgentIdentity:
    cluster: str
    serial: int
    not_after_unix: int


def validate_csr(csr_pem: bytes, cluster: str) -> x509.CertificateSigningRequest:
    """Accept a CSR only if it is well formed, self-signed and asks for nothing beyond ``cluster``.

    Raises CsrInvalid for a malformed request and CsrRefused for one that asks for another cluster,
    for a CA certificate, for other names or extensions, or uses a key type we do not issue for.
    The certificate is built by ``issue`` from the public key alone, whatever the CSR says.
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrInvalid("CSR too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        signed = csr.is_signature_valid
    except (ValueError, InvalidSignature, TypeError) as exc:
        raise CsrInvalid(f"malformed CSR: {exc}") from None
    if not signed:
        raise CsrInvalid("CSR signature is not valid")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ALLOWED_CURVES):
        raise CsrRefused("CSR key must be ECDSA P-256 or P-384")
    if list(csr.subject) and csr.subject != subject_for(cluster):
        raise CsrRefused(f"CSR subject {csr.subject.rfc4514_string()!r} is not CN={CN_PREFIX}{cluster}")
    for extension in csr.extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints):
            if value.ca:
                raise CsrRefused("CSR asks for a CA certificate")
        elif isinstance(value, x509.SubjectAlternativeName):
            names = list(value)
            if names != [x509.UniformResourceIdentifier(uri_for(cluster))]:
                raise CsrRefused(f"CSR may name only {uri_for(cluster)}")
        else:
            raise CsrRefused(f"CSR asks for an extension the relay does not issue ({extension.oid.dotted_string})")
    return csr


def issue(ca: KeyPair, csr: x509.CertificateSigningRequest, cluster: str,
          lifetime: datetime.timedelta) -> x509.Certificate:
    """A client certificate for ``cluster`` with the CSR's public key (call validate_csr first)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    ca_public = ca_cert.public_key()
    # The agent CA is made by ensure_agent_ca (ECDSA); anything else in its files is not ours.
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise TypeError("the agent CA key must be ECDSA")
    # No backdating: only the relay checks this certificate, with the clock that issued it.
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(subject_for(cluster))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri_for(cluster))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def identity_of(cert_pem: bytes) -> AgentIdentity | None:
    """The cluster a (chain-verified) agent certificate names, or None if it names none or two."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    cluster = cluster_of(cert)
    if cluster is None:
        return None
    return AgentIdentity(cluster, cert.serial_number, int(cert.not_valid_after_utc.timestamp()))


async def ensure_agent_ca(store: Store, sealing: SealingKey, legacy_dir: Path) -> KeyPair:
    """The agent CA, made once in the store for every replica (its key sealed); a data directory of an
    earlier version has it in ``legacy_dir``/agent-ca.crt and agent-ca.key, imported on the first start."""
    legacy = (legacy_dir / "agent-ca.crt", legacy_dir / "agent-ca.key")
    return await shared.key_pair(store, sealing, AGENT_CA_KEY, legacy, lambda: create_ca("clusterconnect agent CA"))
