"""Structured-concurrency helpers on top of asyncio.TaskGroup."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
