"""The agent's metrics (clusterconnect_agent_*) and readiness: readings of what the session keeps anyway.

Ready means the control stream to the relay is up (welcomed, not yet ended): only then can a Dial
reach this cluster. While the agent enrolls, or reconnects after losing its relay, it is not.
"""

from __future__ import annotations

from clusterconnect import health, metrics, streams
from clusterconnect.agent.session import Agent


def register(agent: Agent) -> None:
    metrics.gauge("clusterconnect_agent_connected", "1 while the control stream to the relay is up, else 0",
                  lambda: int(agent.connected.is_set()))
    metrics.counter("clusterconnect_agent_sessions_total", "Sessions the relay welcomed (reconnects and handovers"
                    " included)", lambda: agent.sessions_started)
    metrics.gauge("clusterconnect_agent_open_connections", "Connections being carried to the auth proxy",
                  lambda: agent.open_connections, stats="open_connections")
    metrics.gauge("clusterconnect_agent_warm_streams", "Warm Accept/Serve pairs waiting for a Dial",
                  lambda: agent.warm_waiting)
    metrics.counter("clusterconnect_agent_connections_warm_total", "Connections carried on a warm pair",
                    lambda: agent.carried["warm"])
    metrics.counter("clusterconnect_agent_connections_requested_total",
                    "Connections carried on a pair opened for a DialRequest", lambda: agent.carried["requested"])
    metrics.counter("clusterconnect_agent_tunnel_to_cluster_bytes_total", "Bytes carried from the relay to the"
                    " auth proxy", lambda: streams.SPLICED[0])
    metrics.counter("clusterconnect_agent_tunnel_from_cluster_bytes_total", "Bytes carried from the auth proxy"
                    " back to the relay", lambda: streams.SPLICED[1])


def control_stream_up(agent: Agent) -> health.Probe:
    async def probe() -> str | None:
        return None if agent.connected.is_set() else "no control stream to the relay"
    return probe
