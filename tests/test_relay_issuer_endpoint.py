"""The built-in issuer's HTTPS endpoint owns its connections: closing it ends them (real TLS, loopback)."""

from __future__ import annotations

import asyncio
import json
import ssl

from clusterconnect.pki import ensure_ca_and_server_cert
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.user_identity.issuer import Issuer, IssuerEndpoint, SigningKeys


def test_close_ends_open_connections(tmp_path) -> None:
    ca, cert, key = ensure_ca_and_server_cert(tmp_path / "pki", "test CA", ["127.0.0.1"])

    async def scenario() -> None:
        keys = SigningKeys(tmp_path / "relay.db", SealingKey.load_or_create(tmp_path / "sealing.key"), max_age=0)
        issuer = Issuer("https://127.0.0.1", "aud", keys, 60)
        endpoint = IssuerEndpoint(issuer, cert, key)
        port = await endpoint.start("127.0.0.1", 0)
        client = ssl.create_default_context(cafile=str(ca))
        # One client that is served (the endpoint works), one that stays silent: its handler waits
        # for a request (up to the 30 s read timeout) until the endpoint closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.write(b"GET /.well-known/openid-configuration HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        assert json.loads(await reader.readexactly(length))["issuer"] == issuer.url
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        async with asyncio.timeout(5):
            while len(endpoint._connections) < 2:  # noqa: ASYNC110  # both handlers running; no event tells
                await asyncio.sleep(0.01)
        async with asyncio.timeout(5):  # far below the handlers' own read timeout
            await endpoint.close()
        assert not endpoint._connections
        async with asyncio.timeout(5):
            assert await silent_reader.read() == b""  # the server side hung up
            assert await reader.read() == b""
        for w in (writer, silent_writer):
            w.close()
        issuer.keys.close()

    asyncio.run(scenario())
