"""Structured-concurrency helpers on top of asyncio.TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any


class _Finished(Exception):
    pass


def cancelling() -> bool:
    """True while the current task is being cancelled (by its owner, not by a peer's status)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def unwrap(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a TaskGroup failure, so callers can catch plain exception types."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return unwrap(exc)
        if not isinstance(exc, _Finished):
            return exc
    return group


async def race(*awaitables: Awaitable[Any]) -> None:
    """Run the awaitables together; when the first one finishes, cancel the others.

    An exception from any of them cancels the others and propagates (unwrapped).
    """

    async def run(awaitable: Awaitable[Any]) -> None:
        await awaitable
        raise _Finished

    try:
        async with asyncio.TaskGroup() as group:
            for awaitable in awaitables:
                group.create_task(run(awaitable))
    except BaseExceptionGroup as failure:
        if all(isinstance(e, _Finished) for e in failure.exceptions):
            return
        raise unwrap(failure) from None


async def gather_strict(*awaitables: Awaitable[Any]) -> list[Any]:
    """Run all to completion in one TaskGroup; the first failure cancels the rest and propagates."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_as_coro(a)) for a in awaitables]
    except BaseExceptionGroup as failure:
        raise unwrap(failure) from None
    return [t.result() for t in tasks]


async def _as_coro(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class ConnectionTasks:
    """The tasks of a listener's accepted connections, owned by one TaskGroup while ``serving()`` runs:
    when it ends they are cancelled and awaited; before and after, ``start`` refuses (nobody would own
    the task). The client proxy and the gateway serve their connections this way."""

    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                yield
            finally:
                self._group = None
                for task in self._tasks:
                    task.cancel()

    def start(self, connection: Coroutine[Any, Any, None]) -> bool:
        """Run ``connection`` as a task of the group; False (and the coroutine closed) when not serving."""
        if self._group is None:
            connection.close()
            return False
        task = self._group.create_task(connection)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True
