"""The HTTPS front doors' TLS server settings (clusterconnect.tls_server): a real handshake in memory."""

from __future__ import annotations

import ssl
from pathlib import Path

from clusterconnect.pki import create_ca, issue_server_cert, write_private
from clusterconnect.tls_server import http11_server_context


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Both ends through memory BIOs, then one byte from the server, which carries any ticket after it."""
    to_server, from_server, to_client, from_client = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(to_server, from_server, server_side=True)
    c = client.wrap_bio(to_client, from_client, server_hostname="localhost")
    done = set()
    for _ in range(10):
        for name, end in (("client", c), ("server", s)):
            if name not in done:
                try:
                    end.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            to_server.write(from_client.read())
            to_client.write(from_server.read())
    assert done == {"client", "server"}
    s.write(b"x")
    to_client.write(from_server.read())
    assert c.read(1) == b"x"
    return s, c


def test_tls13_with_http11_only_and_no_session_ticket(tmp_path: Path) -> None:
    ca = create_ca("test CA")
    leaf = issue_server_cert(ca, ["localhost"])
    write_private(tmp_path / "tls.key", leaf.key_pem)
    (tmp_path / "tls.crt").write_bytes(leaf.cert_pem)
    server = http11_server_context()
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client.set_alpn_protocols(["h2", "http/1.1"])

    s, c = _handshake(server, client)
    assert c.version() == "TLSv1.3" and c.selected_alpn_protocol() == "http/1.1"  # never h2 (SPDY needs 1.1)
    assert c.session is not None and not c.session.has_ticket  # nothing to resume with: none was sent

    server.num_tickets = 2  # OpenSSL's default: the same handshake then hands the client a ticket
    _, c = _handshake(server, client)
    assert c.session is not None and c.session.has_ticket

