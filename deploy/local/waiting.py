"""Waiting for a condition, with a deadline: the one helper of the tests, the benchmarks and deploy/local.

A wait that times out says what it waited for; one that depends on a process (``process``, such as a
chain.Process) stops as soon as that process exits instead of waiting out the deadline, and either way
shows the end of its log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class WaitFailed(RuntimeError):
    """The condition did not hold in time, or the process it needed exited."""


class Watched(Protocol):
    name: str

    @property
    def returncode(self) -> int | None: ...

    def alive(self) -> bool: ...

    def tail(self) -> str: ...


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, process: Watched | None = None,
               interval: float = 0.05, ignoring: tuple[type[Exception], ...] = ()) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something true, and return that.

    An exception of a type in ``ignoring`` counts as "not yet" (e.g. a kubectl that fails until the pod
    exists); the last one is shown if the wait times out. Any other exception ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
        except ignoring as exc:
            value, last_error = None, exc
        if value:
            return value
        if process is not None and not process.alive():
            raise WaitFailed(
                f"{process.name} exited ({process.returncode}) while waiting for {what}:\n{process.tail()}"
            )
        if time.monotonic() > deadline:
            detail = f"\n{process.name} log:\n{process.tail()}" if process is not None else ""
            if last_error is not None:
                detail += f"\nlast error: {last_error!r}"
            raise WaitFailed(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)
