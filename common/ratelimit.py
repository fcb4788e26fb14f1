"""Limits on failed attempts at a secret (login codes, join tokens), per client address and overall.

Only failures count: a caller whose address has not failed recently is never refused, so someone
else's wrong guesses, however many, do not lock out a person who types the right code. An address
that failed spends from two token buckets: its own, and one shared by every address (which bounds
guessing from many addresses at once). While either is empty, that address is refused until a
token is back. A bucket that has filled up again is forgotten; at most ``max_sources`` addresses
are remembered (the oldest is forgotten first), so the table cannot grow without bound.

The secrets are long (192-bit login codes, 256-bit join tokens): guessing one is hopeless anyway.
The limits keep a guessing client from costing the relay work and filling its log, and keep the
secrets safe if they ever get shorter.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from clusterconnect.errors import ResourceExhausted


@dataclass(frozen=True)
class Rate:
    """``burst`` failures at once, then one more every ``refill_seconds``."""

    burst: int
    refill_seconds: float


# A person mistypes a pasted code a few times at most: 10 in a row, then one every 6 s (10 a minute).
PER_SOURCE = Rate(burst=10, refill_seconds=6.0)
# Every address together: 100 in a row, then 10 a second. Far above what people and agents fail at,
# and it bounds a guesser with many addresses to 864,000 guesses a day (of 2**192 codes).
OVERALL = Rate(burst=100, refill_seconds=0.1)
MAX_SOURCES = 10_000


class _Bucket:
    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.updated = now

    def refill(self, now: float) -> None:
        self.tokens = min(float(self.rate.burst), self.tokens + (now - self.updated) / self.rate.refill_seconds)
        self.updated = now

    def full(self) -> bool:
        return self.tokens >= self.rate.burst

    def empty(self) -> bool:
        return self.tokens < 1.0

    def wait(self) -> float:
        """Seconds until one token is back."""
        return max(0.0, (1.0 - self.tokens) * self.rate.refill_seconds)


class FailureLimiter:
    def __init__(self, what: str, per_source: Rate = PER_SOURCE, overall: Rate = OVERALL,
                 max_sources: int = MAX_SOURCES, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what  # e.g. "login code": names the attempts in the refusal
        self.per_source = per_source
        self.max_sources = max_sources
        self._clock = clock  # tests pass their own to let buckets refill without waiting
        self._overall = _Bucket(overall, clock())
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, source: str) -> None:
        """Raise ResourceExhausted if ``source`` failed too often lately, alone or with everyone else."""
        now = self._clock()
        bucket = self._sources.get(source)
        if bucket is None:
            return  # no recent failure: never refused
        bucket.refill(now)
        self._overall.refill(now)
        if bucket.full():
            del self._sources[source]
            return
        if bucket.empty():
            raise ResourceExhausted(f"too many wrong {self.what}s from this address; try again in"
                                    f" {math.ceil(bucket.wait())} s")
        if self._overall.empty():
            raise ResourceExhausted(f"too many wrong {self.what}s at this relay; try again in"
                                    f" {math.ceil(self._overall.wait())} s")

    def failed(self, source: str) -> None:
        """Count one failed attempt of ``source``."""
        now = self._clock()
        bucket = self._sources.pop(source, None)
        if bucket is None:
            bucket = _Bucket(self.per_source, now)
        bucket.refill(now)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)
        self._sources[source] = bucket  # the most recent at the end: evicted last
        self._overall.refill(now)
        self._overall.tokens = max(0.0, self._overall.tokens - 1.0)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)

    def sources(self) -> int:
        """Addresses remembered now (for tests and stats)."""
        return len(self._sources)


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string, without the port: ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``.

    IPv6 addresses count by their /64 prefix: one host usually holds a whole /64, and counting each of
    its addresses alone would let it pick a fresh one per attempt.
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]") if rest.startswith("[") else rest
        try:
            return str(ipaddress.IPv6Network(f"{host}/64", strict=False).network_address) + "/64"
        except ValueError:
            return host
    return peer  # unix:..., or whatever gRPC says: one bucket per distinct peer string
