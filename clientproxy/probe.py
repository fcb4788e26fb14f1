"""The readiness probe: one real request through the whole path (local TLS, relay, agent, auth proxy, apiserver)."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass

import h11


@dataclass
class ProbeResult:
    status: int
    message: str


def _message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip()
    if isinstance(document, dict) and document.get("kind") == "Status":
        return str(document.get("message", ""))
    if isinstance(document, dict) and "gitVersion" in document:
        return str(document["gitVersion"])
    return ""


async def probe(port: int, context: ssl.SSLContext, token: str | None, timeout: float = 10.0) -> ProbeResult:
    """``context``: trusts the proxy's CA and presents its client certificate, as kubectl does."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("Host", f"127.0.0.1:{port}"), ("User-Agent", "clusterconnect-proxy/probe"),
                       ("Accept", "application/json"), ("Connection", "close")]
            if token:
                headers.append(("Authorization", f"Bearer {token}"))
            writer.write(conn.send(h11.Request(method="GET", target="/version", headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return ProbeResult(status, _message(body))
        finally:
            writer.close()
