"""The warm pairs of one agent session that no Dial has taken yet, and how they end.

A warm pair is one task (agent/session.py ``_warm``) holding an Accept stream at the relay and a Serve
stream at the auth proxy. Once the relay binds it to a Dial, it leaves this set and carries the
connection. Whoever ends the unbound ones must not race that binding:

- the session is over (control stream broken): nothing can bind any more, so they are cancelled;
- the session handed over (drain, renewed certificate): the relay may bind one until it has ended the
  session, and it ends the unbound ones itself as it does. They are left to it (``retire``); cancelling
  them raced a Dial that had just taken one, whose client saw its connection open and close unanswered.
"""

from __future__ import annotations

import asyncio

from clusterconnect.logs import get_logger

log = get_logger(__name__)

# The relay ends a session's unused warm streams as it ends the session, a moment after its control
# stream; one that has not done so by then has them cancelled (a hung relay must not hold the old
# session's channel open for ever).
RETIRE_TIMEOUT = 5.0


class WarmPairs:
    """The unbound warm pairs' tasks (owned by the session's TaskGroup; this set only tracks them)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)

    def discard(self, task: asyncio.Task[None] | None) -> None:
        """``task`` is bound to a Dial, or its warm stream ended unused."""
        if task is not None:
            self._tasks.discard(task)
        self._changed.set()

    def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def retire(self, timeout: float = RETIRE_TIMEOUT) -> None:
        """Wait until the relay has bound or ended each of them, at most ``timeout``; cancel what is left."""
        try:
            async with asyncio.timeout(timeout):
                while self._tasks:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            log.warning("relay did not end the old session's warm streams; ending them", streams=len(self))
        finally:
            self.cancel_all()
