"""How an agent certificate names its cluster; shared by the relay (issuing, checking) and the agent (CSR).

Subject ``CN=cluster:<name>`` and SAN URI ``clusterconnect://cluster/<name>``, nothing else. The relay
reads the cluster from the SAN URI and refuses a certificate whose two names disagree.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CN_PREFIX = "cluster:"
URI_PREFIX = "clusterconnect://cluster/"


def subject_for(cluster: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CN_PREFIX + cluster)])


def uri_for(cluster: str) -> str:
    return URI_PREFIX + cluster


def build_csr(key: ec.EllipticCurvePrivateKey, cluster: str) -> bytes:
    """The CSR an agent sends: its public key, its cluster's subject and SAN URI, nothing else."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject_for(cluster))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri_for(cluster))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def cluster_of(cert: x509.Certificate) -> str | None:
    """The cluster an agent certificate names, or None if it names none, several, or two different ones."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_PREFIX)]
    if len(uris) != 1:
        return None
    cluster = uris[0][len(URI_PREFIX):]
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return cluster if common_names == [CN_PREFIX + cluster] else None
