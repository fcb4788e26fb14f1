"""A ByteStream for unit tests of code that reads from a peer: it yields the given blocks, then waits
for ever (a silent peer), and takes whatever is sent to it."""

from __future__ import annotations

import asyncio


class Blocks:
    def __init__(self, *blocks: bytes) -> None:
        self.blocks = list(blocks)

    async def receive(self) -> bytes:
        if self.blocks:
            return self.blocks.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, data: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    async def close(self) -> None: ...
