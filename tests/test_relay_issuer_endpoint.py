"""The built-in issuer's HTTPS endpoint owns its connections: closing it ends them (real TLS, loopback)."""

from __future__ import annotations

import asyncio
import json
import ssl

from clusterconnect.pki import ensure_ca_and_server_cert
from clusterconnect.relay.storage.kv import SqliteKV
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.issuer import Issuer, IssuerEndpoint, SigningKeys


def test_close_ends_open_connections(tmp_path) -> None:
    ca, cert, key = ensure_ca_and_server_cert(tmp_path / "pki", "test CA", ["127.0.0.1"])

    async def scenario() -> None:
        store = await Store.open(SqliteKV(tmp_path / "relay.db"))
        keys = await SigningKeys.open(store, SealingKey.load_or_create(tmp_path / "sealing.key"), max_age=0)
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
        await store.close()

    asyncio.run(scenario())


def test_a_request_trickling_in_is_cut_at_the_deadline_while_others_are_served(tmp_path) -> None:
    """Slowloris: one byte every 50 ms never completes a request within the deadline (1 s here); the
    endpoint hangs up on it, and serves a normal client meanwhile."""
    ca, cert, key = ensure_ca_and_server_cert(tmp_path / "pki", "test CA", ["127.0.0.1"])
    request = b"GET /.well-known/openid-configuration HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 80 + b"\r\n\r\n"

    async def served(port: int, client: ssl.SSLContext) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return head

    async def scenario() -> None:
        store = await Store.open(SqliteKV(tmp_path / "relay.db"))
        keys = await SigningKeys.open(store, SealingKey.load_or_create(tmp_path / "sealing.key"), max_age=0)
        issuer = Issuer("https://127.0.0.1", "aud", keys, 60)
        endpoint = IssuerEndpoint(issuer, cert, key, request_timeout=1.0)
        port = await endpoint.start("127.0.0.1", 0)
        client = ssl.create_default_context(cafile=str(ca))
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        started = loop.time()
        hung_up = asyncio.create_task(reader.read())  # the server's EOF (or reset) on the slow connection
        sent = 0
        try:
            async with asyncio.timeout(5):  # the whole request at this pace would take over 6 s
                while not hung_up.done() and sent < len(request):
                    try:
                        writer.write(request[sent:sent + 1])
                        await writer.drain()
                    except (ConnectionError, ssl.SSLError):
                        break
                    sent += 1
                    if sent == 5:  # the slow connection is open and being read: a normal one is served
                        assert (await served(port, client)).startswith(b"HTTP/1.1 200 ")
                    await asyncio.sleep(0.05)  # the attacker's pace, not a synchronisation
                try:
                    assert await hung_up == b""
                except (ConnectionError, ssl.SSLError):
                    pass  # a reset is a hang-up too
        finally:
            writer.close()
            await endpoint.close()
            await store.close()
        elapsed = loop.time() - started
        assert sent < len(request), "the whole request went through: no deadline"
        assert 0.9 <= elapsed < 3.0, elapsed

    asyncio.run(scenario())
