"""The client proxy's metrics (clusterconnect_clientproxy_*) and readiness: the relay is reachable.

Readings of what the connection handler keeps anyway; ready once the proxy printed ``ready`` (a request
went all the way) and while its channel to the relay connects.
"""

from __future__ import annotations

import grpc

from clusterconnect import health, metrics, streams
from clusterconnect.clientproxy.tunnel import ConnectionHandler


def register(handler: ConnectionHandler, channel: grpc.aio.Channel) -> None:
    metrics.gauge("clusterconnect_clientproxy_open_connections", "kubectl connections being carried",
                  lambda: handler.open_connections, stats="open_connections")
    metrics.counter("clusterconnect_clientproxy_connections_total", "kubectl connections served (past the TLS"
                    " handshake)", lambda: handler.connections_served)
    metrics.counter("clusterconnect_clientproxy_tunnel_to_cluster_bytes_total", "Bytes sent from kubectl to the"
                    " relay", lambda: streams.SPLICED[0])
    metrics.counter("clusterconnect_clientproxy_tunnel_from_cluster_bytes_total", "Bytes received from the relay"
                    " for kubectl", lambda: streams.SPLICED[1])

    async def relay_reachable() -> str | None:
        # Connects an idle channel; a relay that does not answer runs into the check's deadline.
        await channel.channel_ready()
        return None

    health.check("relay", relay_reachable)
