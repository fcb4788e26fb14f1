"""The auth proxy's HTTP work alone: µs of CPU per small GET in forward_connection, in one process.

    forwarder_micro.py [--requests 3000] [--profile]

Downstream and upstream are in-memory streams (no gRPC, no TLS, no apiserver), so what is left is
h11 (parse and re-send, both directions), header checks, the per-request audit log event (rendered
as usual, written to /dev/null) and the tasks of one exchange. --profile prints cProfile's top entries.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time

import uvloop

from clusterconnect.aadproxy.authn import TokenPassthrough
from clusterconnect.aadproxy.http_forwarder import forward_connection
from clusterconnect.logs import configure_logging

REQUEST = (b"GET /api/v1/namespaces/default HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer a.b.c\r\n"
           b"Accept: application/json\r\nUser-Agent: kubectl/v1.32.0\r\n\r\n")
BODY = b'{"kind":"Namespace","apiVersion":"v1","metadata":{"name":"default"}}' * 5
RESPONSE = (b"HTTP/1.1 200 OK\r\nAudit-Id: 1\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\n"
            b"Date: Sat, 28 Nov 2026 16:00:00 GMT\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


class Downstream:
    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self.outgoing: asyncio.Queue[bytes] = asyncio.Queue()

    async def receive(self) -> bytes:
        return await self.incoming.get()

    async def send(self, data: bytes) -> None:
        self.outgoing.put_nowait(data)

    async def send_eof(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Apiserver(Downstream):
    """Answers every request head with RESPONSE."""

    async def send(self, data: bytes) -> None:
        if data:
            self.incoming.put_nowait(RESPONSE)


async def measure(requests: int, profile: bool) -> float:
    down, up = Downstream(), Apiserver()

    async def connect() -> Apiserver:
        return up

    async def one() -> None:
        down.incoming.put_nowait(REQUEST)
        received = b""
        while not received.endswith(BODY):
            received += await down.outgoing.get()

    server = asyncio.create_task(forward_connection(down, connect, TokenPassthrough()))
    try:
        for _ in range(200):
            await one()
        profiler = cProfile.Profile() if profile else None
        start = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(requests):
            await one()
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return (time.process_time() - start) / requests
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    # The audit events: rendered, not shown. The loggers keep writing to devnull until exit.
    devnull = open(os.devnull, "w")  # noqa: SIM115 -- open for the process's lifetime, see above
    stderr, sys.stderr = sys.stderr, devnull
    try:
        configure_logging("aadproxy", "info")
    finally:
        sys.stderr = stderr
    seconds = uvloop.run(measure(args.requests, args.profile))
    print(f"forward_connection: {seconds * 1e6:.0f} µs CPU per small GET (with the test's own streams)")


if __name__ == "__main__":
    main()
