"""Live agent sessions and the pairing of a client's Dial with the agent's Accept.

A Dial registers a pending future under a fresh dial id and asks the agent, over its control
stream, to open Accept with that id. The Accept handler hands its stream to the future and then
waits until the Dial side has finished splicing; if the agent's stream dies first it says so, and
the Dial side tears the connection down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from clusterconnect.streams import ByteStream
from clusterconnect.v1 import tunnel_pb2

# Control messages waiting for one agent. A full queue means the agent's stream is stuck; new
# dials then fail fast instead of piling up.
OUTBOX_SIZE = 1024
# Warm Accept streams kept per agent at most; an agent asking for more is refused.
MAX_WARM = 8


@dataclass(eq=False)
class AcceptedStream:
    """The agent's side of one connection, handed from the Accept handler to the Dial handler."""

    stream: ByteStream
    # Set by the Accept handler when the agent's stream ends abnormally.
    peer_lost: asyncio.Event = field(default_factory=asyncio.Event)
    # Resolved by the Dial handler when the connection is over: True if it ended cleanly.
    finished: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    # Warm streams only: a Dial puts its traceparent here; the Accept handler sends Chunk{bound} (in its
    # own task: a write cancelled half-way, as a cancelled Dial would, leaves grpc.aio unable to end
    # that RPC) and answers in ``ready`` whether the stream is usable.
    binding: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, clean: bool) -> None:
        if not self.finished.done():
            self.finished.set_result(clean)


@dataclass(eq=False)
class AgentSession:
    cluster: str
    agent_version: str
    kubernetes_version: str
    last_seen: float = field(default_factory=time.time)
    outbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(OUTBOX_SIZE))
    pending: dict[str, asyncio.Future] = field(default_factory=dict)
    active: set[AcceptedStream] = field(default_factory=set)
    # Warm Accept streams the agent opened ahead of need, oldest first (see tunnel.proto).
    warm: list[AcceptedStream] = field(default_factory=list)
    # Set to end the session from outside (cluster removed, replaced by a newer connection).
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""

    def request_dial(self, traceparent: str = "") -> tuple[str, asyncio.Future]:
        """Queue a DialRequest; raises asyncio.QueueFull when the agent is not keeping up."""
        dial_id = uuid.uuid4().hex
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        message = tunnel_pb2.RelayMessage(
            dial=tunnel_pb2.DialRequest(dial_id=dial_id, traceparent=traceparent)
        )
        self.outbox.put_nowait(message)
        self.pending[dial_id] = future
        return dial_id, future

    def add_warm(self, accepted: AcceptedStream) -> bool:
        """Keep a warm stream for the next Dial; False if the agent already has enough."""
        if len(self.warm) >= MAX_WARM or self.ended.is_set():
            return False
        self.warm.append(accepted)
        return True

    def take_warm(self) -> AcceptedStream | None:
        while self.warm:
            accepted = self.warm.pop(0)
            if not accepted.peer_lost.is_set():
                return accepted
        return None

    def discard_warm(self, accepted: AcceptedStream) -> None:
        if accepted in self.warm:
            self.warm.remove(accepted)

    def end(self, reason: str, drop_connections: bool = True) -> None:
        self.end_reason = reason
        self.ended.set()
        # Warm streams carry nothing yet; they belong to this session's channel and end with it.
        for accepted in self.warm:
            accepted.finish(False)
        self.warm.clear()
        if drop_connections:
            for accepted in list(self.active):
                accepted.peer_lost.set()


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

    def add(self, session: AgentSession) -> None:
        previous = self._sessions.get(session.cluster)
        if previous is not None:
            # The older control stream ends, but its connections go on: an agent that renewed its
            # certificate reconnects with the new one and lets the connections of the old channel
            # finish. Dials the older session was asked for can still be accepted.
            session.pending = previous.pending
            previous.end("replaced by a newer connection of the same agent", drop_connections=False)
        self._sessions[session.cluster] = session

    def discard(self, session: AgentSession) -> None:
        self.last_seen[session.cluster] = session.last_seen
        if self._sessions.get(session.cluster) is session:
            del self._sessions[session.cluster]

    def end(self, cluster: str, reason: str) -> None:
        session = self._sessions.get(cluster)
        if session is not None:
            session.end(reason)
