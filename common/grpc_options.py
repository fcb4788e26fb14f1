"""gRPC channel and server settings shared by every service.

Keepalive finds dead peers (DESIGN property 4): clients ping every 20 s and give up after 10 s
without an answer; the agent's channel to the relay pings every 5 s and gives up after 5 s, so a
silent relay (SIGSTOP, a blackholed link) is found within 10 s and the agent moves to another
replica. Servers accept pings that often (otherwise they answer GOAWAY too_many_pings).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlparse

from clusterconnect.errors import InvalidInput

MAX_MESSAGE = 8 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Fail fast while the relay is down; our own loops do the retrying.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # How long one connection attempt (TCP + TLS handshake) may take; default 20 s. A relay taking
    # back thousands of agents at once can take longer than that to get to a handshake, and an agent
    # that gives up throws away the handshake and queues again behind everyone else. An unreachable
    # or refusing relay still fails at once (and calls have their own deadlines).
    ("grpc.min_reconnect_backoff_ms", 60_000),
    ("grpc.enable_retries", 0),
]

# The agent's channel to the relay: a silent relay found within 10 s (keepalive time + timeout).
AGENT_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    *[(key, value) for key, value in CHANNEL_OPTIONS
      if key not in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms")],
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]

SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # At most the agent's ping interval (AGENT_CHANNEL_OPTIONS), else its pings count as strikes.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]

# The relay's server: every agent of the fleet holds one Connect call on it, and a relay restart
# brings them all back within seconds. gRPC core parks calls that arrive faster than the event loop
# takes them up, and by default cancels any call parked for 30 s (the agent sees CANCELLED; core's
# newer call path also refuses calls beyond 1,000 parked, at random, and all beyond 3,000). So
# once a burst needed more than 30 s of Connect handling, its late calls were cancelled after both
# sides had paid for the TLS handshake; they retried and paid again: 10,000 agents took minutes.
# A parked call costs a few KiB, much less than the handshake of its retry, so the relay parks them.
RELAY_SERVER_OPTIONS: list[tuple[str, int | str]] = [
    *SERVER_OPTIONS,
    ("grpc.server.max_pending_requests", 50_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ("grpc.server_max_unrequested_time_in_server", 300),
]


def grpc_target(url: str) -> str:
    """``https://host:port``, ``grpcs://host:port`` or ``host:port`` -> ``host:port`` (gRPC target)."""
    if "://" not in url:
        url = "https://" + url
    parsed = urlparse(url)
    if not parsed.hostname:
        raise InvalidInput(f"not a host:port address: {url!r}")
    host = parsed.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parsed.port or 443}"


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


# What grpc.aio hands a handler as invocation metadata (or a client as initial metadata): key/value pairs.
Metadata = Iterable[tuple[str, str | bytes]] | None


def bearer_from_metadata(metadata: Metadata) -> str | None:
    """The token of the one ``authorization: Bearer`` entry, or None (also for several entries)."""
    values = [v for k, v in (metadata or ()) if k == "authorization" and isinstance(v, str)]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def metadata_value(metadata: Metadata, key: str) -> str | None:
    values = [v for k, v in (metadata or ()) if k == key and isinstance(v, str)]
    return values[0] if len(values) == 1 else None
