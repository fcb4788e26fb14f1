"""The relay's metrics (clusterconnect_relay_*): its data path, counted where it already keeps count.

Per connection, never per message: a Dial's outcome and the time it took to open are counted once,
when the relay sends "open" or its refusal; sessions when they end. The rest are readings of numbers
the relay keeps anyway (clusterconnect.metrics), which the SIGUSR1 stats line shows too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from clusterconnect import metrics, streams
from clusterconnect.metadata import DialRefusal

if TYPE_CHECKING:
    from clusterconnect.relay.datapath.sessions import EndReason, SessionTable
    from clusterconnect.relay.datapath.tunnel import Tunnel

DIALS = Counter(
    "clusterconnect_relay_dials_total",
    "Dials (client connections) answered by this relay: outcome ok (the path opened) or refused, with the"
    " refusal's reason (x-clusterconnect-reason; none when ok)",
    ["outcome", "reason"], registry=metrics.REGISTRY,
)
# From the Dial's arrival to "open": the access check, the agent's stream (warm: taken from the pool;
# requested: a DialRequest round trip to the agent) or the Forward to the replica holding the agent.
DIAL_SECONDS = Histogram(
    "clusterconnect_relay_dial_duration_seconds",
    "Time from a Dial's arrival to its path being open; stream warm or requested (remote: decided by the"
    " owner replica), route local, forwarded (to the owner replica) or from_peer (forwarded to us)",
    ["stream", "route"], registry=metrics.REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SESSIONS_ENDED = Counter(
    "clusterconnect_relay_agent_sessions_ended_total",
    "Agent sessions (control streams) that ended, by reason; heartbeat_missed: no heartbeat for three intervals",
    ["reason"], registry=metrics.REGISTRY,
)
CONNECTIONS_BROKEN = Counter(
    "clusterconnect_relay_connections_broken_total",
    "Open connections that ended otherwise than in order: connection_lost (a stream went away) or"
    " access_revoked (its identity lost access, or its token expired)",
    ["reason"], registry=metrics.REGISTRY,
)

# Reasons a connection ends with after it opened; every other DialRefusal is a refused Dial.
_AFTER_OPEN = {DialRefusal.CONNECTION_LOST, DialRefusal.ACCESS_REVOKED}
_OK = DIALS.labels("ok", "none")


def refused(reason: DialRefusal) -> None:
    """A Dial (or an open connection) ended with ``reason``."""
    if reason in _AFTER_OPEN:
        CONNECTIONS_BROKEN.labels(reason.name.lower()).inc()
    else:
        DIALS.labels("refused", reason.value).inc()


def opened(seconds: float, stream: str, route: str) -> None:
    """A Dial's path is open, ``seconds`` after it arrived."""
    _OK.inc()
    DIAL_SECONDS.labels(stream, route).observe(seconds)


def session_ended(reason: EndReason) -> None:
    SESSIONS_ENDED.labels(reason.name.lower()).inc()


def register(tunnel: Tunnel, sessions: SessionTable) -> None:
    """The relay's readings; the stats line's keys are those tests and tools read (unchanged)."""
    metrics.gauge("clusterconnect_relay_agent_sessions", "Agents connected (one control stream each)",
                  lambda: len(sessions), stats="agents")
    metrics.gauge("clusterconnect_relay_open_connections", "Client connections being carried",
                  lambda: tunnel.open_connections, stats="open_connections")
    metrics.gauge("clusterconnect_relay_warm_streams", "Warm Accept streams waiting for a Dial, over all agents",
                  sessions.warm_streams, stats="warm_streams")
    metrics.counter("clusterconnect_relay_dials_warm_total", "Dials served on a warm stream",
                    lambda: tunnel.dials_warm, stats="dials_warm")
    metrics.counter("clusterconnect_relay_dials_requested_total", "Dials that asked the agent for a stream",
                    lambda: tunnel.dials_requested, stats="dials_requested")
    metrics.counter("clusterconnect_relay_dials_local_total", "Dials served by an agent held here",
                    lambda: tunnel.dials_local, stats="dials_local")
    metrics.counter("clusterconnect_relay_dials_forwarded_total", "Dials forwarded to the replica holding the agent",
                    lambda: tunnel.dials_forwarded, stats="dials_forwarded")
    metrics.counter("clusterconnect_relay_dials_from_peers_total", "Dials other replicas forwarded here",
                    lambda: tunnel.dials_from_peers, stats="dials_from_peers")
    metrics.counter("clusterconnect_relay_tunnel_to_cluster_bytes_total",
                    "Bytes carried from clients toward their clusters", lambda: streams.SPLICED[0])
    metrics.counter("clusterconnect_relay_tunnel_from_cluster_bytes_total",
                    "Bytes carried from clusters back to their clients", lambda: streams.SPLICED[1])
