"""Reconnect delays: exponential with full jitter, capped (so a fleet of agents does not reconnect in lockstep)."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        # Keep at least a tenth of the ceiling so a burst of failures never turns into a busy loop.
        return self._rng.uniform(ceiling / 10, ceiling)

    def reset(self) -> None:
        self.attempt = 0
