"""Live agent sessions: one per cluster, with its control outbox, its warm streams and its connections.

A Dial takes a warm Accept stream from the session's pool, or registers a pending dial and queues a
DialRequest for the agent, whose Accept then answers it (relay/datapath/pairing.py has both state
machines). When a session ends, its unused warm streams end with it and, unless a newer session of
the same agent replaced it, so do its connections.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time

from clusterconnect.relay.datapath.pairing import (
    AcceptedStream,
    IllegalTransition,
    PendingDial,
    PendingDials,
    StreamEnd,
    StreamState,
)
from clusterconnect.v1 import tunnel_pb2

# Control messages waiting for one agent. A full queue means the agent's stream is stuck; new
# dials then fail fast instead of piling up.
OUTBOX_SIZE = 1024
# Warm Accept streams kept per agent at most; an agent asking for more is refused.
MAX_WARM = 8


class EndReason(enum.Enum):
    """Why a session ended (the value is what the log says)."""

    AGENT_CLOSED = "agent closed its stream"
    HEARTBEAT_MISSED = "no heartbeat for three intervals"
    CLUSTER_REMOVED = "cluster removed"
    REPLACED = "replaced by a newer connection of the same agent"
    DISCONNECTED = "agent disconnected"
    # After a Drain: the agent left for its next session elsewhere; its open connections go on.
    DRAINED = "agent moved to another relay replica after a drain"
    RELAY_STOPPING = "relay stopping"


class AgentSession:
    def __init__(self, cluster: str, agent_version: str, kubernetes_version: str) -> None:
        self.cluster = cluster
        self.agent_version = agent_version
        self.kubernetes_version = kubernetes_version
        self.last_seen = time.time()
        self.outbox: asyncio.Queue[tunnel_pb2.RelayMessage] = asyncio.Queue(OUTBOX_SIZE)
        self.dials = PendingDials()
        # Streams a Dial is splicing (or about to): dropped when the session ends for good.
        self.active: set[AcceptedStream] = set()
        # Warm Accept streams the agent opened ahead of need, oldest first (see tunnel.proto).
        self.warm: list[AcceptedStream] = []
        # Set to end the session from outside (cluster removed, replaced by a newer connection).
        self.ended = asyncio.Event()
        self.end_reason: EndReason | None = None
        # Names this session in its route (relay/routing/): which of the agent's sessions a replica holds.
        self.session_id = secrets.token_hex(8)
        # Set once the relay sent Drain: the agent's goodbye then leaves its open connections running.
        self.draining = False
        # The newer session of the same agent that replaced this one: its DialRequests go there.
        self.successor: AgentSession | None = None

    @property
    def gone(self) -> bool:
        """Ended without handing its dials on (a REPLACED session hands them to the newer one): a Dial asked
        of it would wait for nothing."""
        return self.ended.is_set() and self.end_reason is not EndReason.REPLACED

    def drain(self, reason: str) -> bool:
        """Ask the agent to move (tunnel.proto Drain); False if its control stream is not keeping up."""
        self.draining = True
        try:
            self.outbox.put_nowait(tunnel_pb2.RelayMessage(drain=tunnel_pb2.Drain(reason=reason)))
        except asyncio.QueueFull:
            return False
        return True

    def request_dial(self, traceparent: str = "", caller: tunnel_pb2.Caller | None = None) -> PendingDial:
        """Queue a DialRequest (on the newest session of the agent: nobody reads a replaced one's outbox);
        raises asyncio.QueueFull when the agent is not keeping up."""
        if self.successor is not None:
            return self.successor.request_dial(traceparent, caller)
        dial = self.dials.new()
        request = tunnel_pb2.DialRequest(dial_id=dial.dial_id, traceparent=traceparent,
                                         caller=caller if caller is not None else tunnel_pb2.Caller())
        try:
            self.outbox.put_nowait(tunnel_pb2.RelayMessage(dial=request))
        except asyncio.QueueFull:
            self.dials.forget(dial)
            raise
        return dial

    def add_warm(self, accepted: AcceptedStream) -> bool:
        """Keep a warm stream for the next Dial; False if the agent already has enough."""
        if accepted.state is not StreamState.WARM:
            raise IllegalTransition(f"only a WARM stream joins the pool, not {accepted!r}")
        if len(self.warm) >= MAX_WARM or self.ended.is_set():
            return False
        self.warm.append(accepted)
        return True

    def take_warm(self, traceparent: str, caller: tunnel_pb2.Caller | None = None) -> AcceptedStream | None:
        """The oldest warm stream still open, taken for a Dial (now BINDING); None if there is none."""
        while self.warm:
            accepted = self.warm.pop(0)
            if not accepted.ended:
                accepted.take(traceparent, caller)
                return accepted
        return None

    def discard_warm(self, accepted: AcceptedStream) -> None:
        if accepted in self.warm:
            self.warm.remove(accepted)

    def end(self, reason: EndReason, drop_connections: bool = True) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        self.ended.set()
        if self.gone:
            self.dials.orphan_all()
        # Warm streams carry nothing yet; they belong to this session's channel and end with it.
        for accepted in self.warm:
            accepted.end(StreamEnd.UNUSED)
        self.warm.clear()
        if drop_connections:
            for accepted in list(self.active):
                accepted.end(StreamEnd.DROPPED)


class SessionTable:
    """cluster name -> the one live session of its agent. A newer connection replaces an older one."""

    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        # When each cluster's agent was last seen by this relay process (for error messages).
        self.last_seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def warm_streams(self) -> int:
        """Warm Accept streams waiting for a Dial, over all agents."""
        return sum(len(session.warm) for session in self._sessions.values())

    def get(self, cluster: str) -> AgentSession | None:
        return self._sessions.get(cluster)

    def all(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def add(self, session: AgentSession) -> None:
        previous = self._sessions.get(session.cluster)
        if previous is not None:
            # The older control stream ends, but its connections go on: an agent that renewed its
            # certificate reconnects with the new one and lets the connections of the old channel
            # finish. Dials the older session was asked for can still be accepted.
            # DialRequests still queued move along: the older outbox is read no more.
            session.dials = previous.dials
            previous.successor = session
            while not previous.outbox.empty():
                message = previous.outbox.get_nowait()
                if message.WhichOneof("message") == "dial" and not session.outbox.full():
                    session.outbox.put_nowait(message)
            previous.end(EndReason.REPLACED, drop_connections=False)
        self._sessions[session.cluster] = session

    def discard(self, session: AgentSession) -> None:
        self.last_seen[session.cluster] = session.last_seen
        if self._sessions.get(session.cluster) is session:
            del self._sessions[session.cluster]

    def end(self, cluster: str, reason: EndReason) -> None:
        session = self._sessions.get(cluster)
        if session is not None:
            session.end(reason)
