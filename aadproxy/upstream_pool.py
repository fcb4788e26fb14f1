"""A few idle TLS connections to the apiserver, opened ahead of need, to take the handshake off the dial path.

Each pooled connection carries no identity (the forwarding TLS context has no client certificate),
is handed to exactly one downstream connection, and never comes back: connections are never shared
between callers. A connection asks for one only after a request was authenticated (upstream.py), and the
pool refills only when one was taken, so unauthenticated traffic opens nothing upstream.
A connection idle longer than MAX_IDLE is dropped (the apiserver closes idle ones eventually).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable

from clusterconnect.logs import get_logger
from clusterconnect.socket_stream import SocketStream

log = get_logger(__name__)

MAX_IDLE = 20.0
RETRY = 1.0


class UpstreamPool:
    def __init__(self, connect: Callable[[], Awaitable[SocketStream]], size: int = 2) -> None:
        self._connect = connect
        self.size = size
        self._idle: deque[tuple[float, SocketStream]] = deque()
        self._wanted = asyncio.Event()
        self._wanted.set()

    async def connect(self) -> SocketStream:
        """A fresh connection: an idle pooled one if usable, else a new one."""
        while self._idle:
            opened, stream = self._idle.popleft()
            self._wanted.set()
            if time.monotonic() - opened < MAX_IDLE and not stream.ended():
                return stream
            stream.abort()
        return await self._connect()

    async def run(self) -> None:
        """Keep the pool filled; owned by the service's task group."""
        try:
            while True:
                await self._wanted.wait()
                self._expire()
                if len(self._idle) >= self.size:
                    self._wanted.clear()
                    # Come back when one is taken, or to replace one before it goes stale.
                    try:
                        await asyncio.wait_for(self._wanted.wait(), MAX_IDLE / 2)
                    except TimeoutError:
                        self._wanted.set()
                    continue
                try:
                    self._idle.append((time.monotonic(), await self._connect()))
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    log.debug("upstream pool cannot connect", error=type(exc).__name__)
                    await asyncio.sleep(RETRY)
        finally:
            while self._idle:
                self._idle.popleft()[1].abort()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._idle and (now - self._idle[0][0] >= MAX_IDLE / 2 or self._idle[0][1].ended()):
            _, stream = self._idle.popleft()
            stream.abort()

