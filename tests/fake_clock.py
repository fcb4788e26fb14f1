"""A clock for the code under test that moves only when the test says so (expiry without waiting)."""

from __future__ import annotations

import time


class FakeClock:
    """Call it for the time (seconds since the epoch, like ``time.time``); ``advance`` moves it on."""

    def __init__(self, now: float | None = None) -> None:
        # Whole seconds: the stores keep *_unix columns as integers, so boundaries are exact.
        self.now = float(int(time.time() if now is None else now))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
