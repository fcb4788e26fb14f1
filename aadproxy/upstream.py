"""One downstream connection's own apiserver connection: opened lazily, watched while idle, and after
a 101 one end of a raw byte pipe.

It is opened at the first authenticated request (from the warm pool, see upstream_pool.py) and
reused only by later requests of the same downstream connection; it is never shared. Between
requests a watcher task notices the apiserver closing it, so the next request reconnects instead of
failing. Its tasks run in the connection's TaskGroup (http_forwarder.py), so none outlives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from clusterconnect.errors import Unavailable
from clusterconnect.streams import ByteStream, PeerGone
from clusterconnect.tasks import cancelling

ConnectUpstream = Callable[[], Awaitable[ByteStream]]

_open = [0]


def open_upstream_connections() -> int:
    """Upstream (apiserver) connections open now."""
    return _open[0]


class ApiserverGone(Unavailable):
    """The apiserver's side of a raw pipe broke: the whole connection ends (logged, never answered)."""


def abort(stream: ByteStream) -> None:
    """Drop a socket-backed stream at once (no TLS close_notify, no waiting)."""
    drop = getattr(stream, "abort", None)
    if drop is not None:
        drop()


class Upstream:
    """The apiserver connection of one downstream connection; ``tasks`` is that connection's group."""

    def __init__(self, connect: ConnectUpstream, tasks: asyncio.TaskGroup) -> None:
        self._connect = connect
        self._tasks = tasks
        self.stream: ByteStream | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect; raises what ``connect`` raises (OSError, ssl.SSLError, TimeoutError, PeerGone)."""
        self.stream = await self._connect()
        _open[0] += 1

    async def drop(self) -> None:
        """Close the connection (at once if we are being cancelled); the next request opens another."""
        stream = self.stream
        if stream is None:
            return
        self.stream = None
        _open[0] -= 1
        if cancelling():
            abort(stream)
        await stream.close()

    def watch_idle(self) -> None:
        """While idle between requests, notice the apiserver closing (or babbling) at once."""
        if self.stream is not None and self._watcher is None:
            self._watcher = self._tasks.create_task(self._watch(self.stream))

    async def stop_watching(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])

    async def _watch(self, stream: ByteStream) -> None:
        try:
            await stream.receive()  # any outcome while idle means the connection is unusable
        except PeerGone:
            pass
        if self.stream is stream:
            abort(stream)
            await self.drop()

    async def close(self) -> None:
        """The downstream connection ends: stop the watcher (its group awaits it) and drop the connection."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
        await self.drop()

    async def pipe(
        self,
        receive_down: Callable[[], Awaitable[bytes]],
        downstream: ByteStream,
        down_rest: bytes,
        down_closed: bool,
        up_rest: bytes,
        up_closed: bool,
    ) -> None:
        """After a 101: raw bytes both ways until both directions ended.

        ``down_rest`` are client bytes read past the request (already the upgraded protocol's);
        ``down_closed`` says the client had ended its side already; ``up_rest`` and ``up_closed`` are
        the same for the apiserver's side (bytes after its 101). The apiserver's side breaking
        raises ApiserverGone; the client's raises PeerGone.
        """
        assert self.stream is not None
        upstream = self.stream

        async def send_up(data: bytes) -> None:
            try:
                await upstream.send(data)
            except PeerGone:
                raise ApiserverGone("the apiserver stopped reading the upgraded stream") from None

        async def to_apiserver() -> None:
            if down_rest:
                await send_up(down_rest)
            while not down_closed:
                data = await receive_down()
                if not data:
                    break
                await send_up(data)
            try:
                await upstream.send_eof()
            except PeerGone:
                raise ApiserverGone("the apiserver closed the upgraded stream") from None

        async def to_client() -> None:
            if up_rest:
                await downstream.send(up_rest)
            while not up_closed:
                try:
                    data = await upstream.receive()
                except PeerGone:
                    raise ApiserverGone("the apiserver broke off the upgraded stream") from None
                if not data:
                    break
                await downstream.send(data)
            await downstream.send_eof()

        async with asyncio.TaskGroup() as group:
            group.create_task(to_apiserver())
            group.create_task(to_client())
