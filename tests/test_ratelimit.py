"""The limiter of failed attempts at a secret (clusterconnect.ratelimit): pure logic, a clock of its own."""

from __future__ import annotations

import pytest
from fake_clock import FakeClock

from clusterconnect.errors import ResourceExhausted
from clusterconnect.ratelimit import FailureLimiter, Rate, peer_address


def _limiter(clock: FakeClock, **kwargs) -> FailureLimiter:
    kwargs.setdefault("per_source", Rate(burst=3, refill_seconds=10.0))
    kwargs.setdefault("overall", Rate(burst=100, refill_seconds=1.0))
    return FailureLimiter("login code", clock=clock, **kwargs)


def _fail(limiter: FailureLimiter, source: str, times: int) -> None:
    for _ in range(times):
        limiter.check(source)
        limiter.failed(source)


def test_a_source_is_refused_after_its_burst_until_a_token_is_back():
    clock = FakeClock(1000.0)
    limiter = _limiter(clock)
    _fail(limiter, "10.0.0.1", 3)
    with pytest.raises(ResourceExhausted, match="too many wrong login codes from this address; try again in 10 s"):
        limiter.check("10.0.0.1")
    clock.advance(9.9)
    with pytest.raises(ResourceExhausted):
        limiter.check("10.0.0.1")
    clock.advance(0.1)
    limiter.check("10.0.0.1")  # one token back: one more try
    limiter.failed("10.0.0.1")
    with pytest.raises(ResourceExhausted):
        limiter.check("10.0.0.1")


def test_one_sources_failures_never_block_another_that_has_not_failed():
    clock = FakeClock(1000.0)
    limiter = _limiter(clock, per_source=Rate(burst=5, refill_seconds=10.0), overall=Rate(burst=6, refill_seconds=60.0))
    for source in ("10.0.0.1", "10.0.0.2"):
        _fail(limiter, source, 3)
    with pytest.raises(ResourceExhausted, match="at this relay"):  # everyone together spent the overall burst ...
        limiter.check("10.0.0.2")
    limiter.check("10.0.0.3")  # ... but an address without failures is let through, however many others failed


def test_the_overall_bucket_bounds_many_sources_together():
    clock = FakeClock(1000.0)
    limiter = _limiter(clock, overall=Rate(burst=4, refill_seconds=1.0))
    for i in range(4):
        _fail(limiter, f"10.0.1.{i}", 1)
    # Each of them has tokens of its own left; together they spent the overall burst.
    with pytest.raises(ResourceExhausted, match="at this relay; try again in 1 s"):
        limiter.check("10.0.1.0")
    clock.advance(1.0)
    limiter.check("10.0.1.0")


def test_a_refilled_source_is_forgotten_and_the_table_is_bounded():
    clock = FakeClock(1000.0)
    limiter = _limiter(clock, max_sources=3)
    _fail(limiter, "a", 1)
    clock.advance(10.0)
    limiter.check("a")  # full again: forgotten
    assert limiter.sources() == 0
    for source in ("a", "b", "c", "d"):
        _fail(limiter, source, 3)
    assert limiter.sources() == 3
    limiter.check("a")  # the oldest was forgotten first
    with pytest.raises(ResourceExhausted):
        limiter.check("d")


def test_successes_cost_nothing():
    clock = FakeClock(1000.0)
    limiter = _limiter(clock)
    for _ in range(1000):
        limiter.check("10.0.0.1")  # check without failed(): a success
    assert limiter.sources() == 0


@pytest.mark.parametrize("peer,address", [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"),
    ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
    ("ipv6:[2001:db8:1:2:ffff::1]:443", "2001:db8:1:2::/64"),
    ("ipv6:[::1]:5000", "::/64"),
    ("unix:/run/relay.sock", "unix:/run/relay.sock"),
])
def test_peer_address_drops_the_port_and_groups_ipv6_by_64(peer, address):
    assert peer_address(peer) == address
