"""The pairing of a client's Dial with the agent's Accept stream: two small state machines.

An :class:`AcceptedStream` is the agent's side of one connection (one ``AgentTunnel.Accept`` call).
Two tasks share it and talk only through its transitions: the Accept handler, which owns that call,
and the Dial handler, which owns the client's. Each writes only to its own call: the Dial handler
pumps the agent's bytes to the client, the Accept handler the client's bytes to the agent (a write
cancelled half-way, as one from the other call's task could be, leaves grpc.aio unable to end the
call it was on)::

    WARM ──take()──▶ BINDING ──bound()──▶ SPLICING ──end(reason)──▶ ENDED(reason)
      │                 │                   ⟲ join(client)             ▲
      └─────────────────┴──────────────end(reason)─────────────────────┘

- WARM: opened by the agent ahead of need (``x-clusterconnect-warm: 1``), waiting in its session's pool.
- BINDING: a Dial took it; the Accept handler sends ``Chunk{bound}`` from its own task (a write
  cancelled half-way, as a cancelled Dial's would be, leaves grpc.aio unable to end that call).
- SPLICING: the Dial splices it with its own stream. An Accept that answers a DialRequest starts here.
  ``join(client)`` gives the Accept handler the client's stream to pump toward the agent; it
  reports the end of that direction with ``forwarded(error)`` (None at the client's EOF).
- ENDED: for a :class:`StreamEnd` reason. Only CLEAN lets the Accept call end with OK.

A :class:`PendingDial` is a Dial waiting for the agent to answer its DialRequest with an Accept::

    PENDING ──accept(stream)──▶ ACCEPTED ──abandon()──▶ ABANDONED   (the accepted stream ends too)
       ├────────────abandon()──────────────────────────▶ ABANDONED   (an Accept arriving later is refused)
       └────────────orphan()───────────────────────────▶ ORPHANED    (its session ended: the waiter hears
                                                                      SessionGone and may Dial elsewhere)

Both sides may end a stream at the same moment (the client goes away as the agent's stream breaks),
so ``end`` of an ENDED stream is no transition: the first reason stays. Likewise ``bound`` after the
Dial gave up waiting for it, and ``join`` of a stream that ended as the Dial got it. Any other
transition from a state that does not allow it is a bug in the relay and raises
:class:`IllegalTransition`. Nothing here does I/O: it is tested without sockets
(tests/test_relay_pairing.py).
"""

from __future__ import annotations

import asyncio
import enum
import uuid

from clusterconnect.streams import ByteStream, PeerGone
from clusterconnect.v1 import tunnel_pb2


class IllegalTransition(RuntimeError):
    """A programming error in the relay: a transition its current state does not allow."""


class StreamState(enum.Enum):
    WARM = "warm"
    BINDING = "binding"
    SPLICING = "splicing"
    ENDED = "ended"


class StreamEnd(enum.Enum):
    """Why an agent's stream ended; the Accept handler's status follows from it."""

    CLEAN = "clean"  # the connection ended in order at both ends
    ABANDONED = "abandoned"  # the Dial side ended it otherwise: client gone, Dial cancelled, splice failed
    LOST = "lost"  # the agent's side went away (its Accept call ended, or Chunk{bound} could not be sent)
    DROPPED = "dropped"  # its session ended and took its connections along (cluster removed)
    UNUSED = "unused"  # a warm stream whose session ended before a Dial took it


class AcceptedStream:
    """The agent's side of one connection, from the Accept handler to a Dial and back (see module doc)."""

    def __init__(self, stream: ByteStream, state: StreamState) -> None:
        if state not in (StreamState.WARM, StreamState.SPLICING):
            raise IllegalTransition(f"a stream starts WARM or SPLICING, not {state.name}")
        self.stream = stream
        self.state: StreamState = state
        self.end_reason: StreamEnd | None = None
        self.traceparent = ""  # the Dial's, once taken
        # Who opened the connection (the relay's verdict for the Dial), sent in Chunk{bound}.
        self.caller = tunnel_pb2.Caller()
        self.client: ByteStream | None = None  # the Dial's stream, once joined
        self.forward_error: PeerGone | None = None  # what ended the client -> agent direction, if not its EOF
        # One event per state a waiter waits for; ending sets them all, so no waiter is left behind.
        self._taken = asyncio.Event()
        self._bound = asyncio.Event()
        self._joined = asyncio.Event()
        self._forwarded = asyncio.Event()
        self._ended = asyncio.Event()
        if state is StreamState.SPLICING:  # past taking and binding: nobody waits for those
            self._taken.set()
            self._bound.set()

    @classmethod
    def warm(cls, stream: ByteStream) -> AcceptedStream:
        return cls(stream, StreamState.WARM)

    @classmethod
    def requested(cls, stream: ByteStream) -> AcceptedStream:
        return cls(stream, StreamState.SPLICING)

    def __repr__(self) -> str:
        end = f"({self.end_reason.name})" if self.end_reason else ""
        return f"<AcceptedStream {self.state.name}{end}>"

    @property
    def ended(self) -> bool:
        return self.state is StreamState.ENDED

    def _require(self, *allowed: StreamState, event: str) -> None:
        if self.state not in allowed:
            raise IllegalTransition(f"{event} in state {self.state.name}")

    # -- transitions ----------------------------------------------------------------------------

    def take(self, traceparent: str, caller: tunnel_pb2.Caller | None = None) -> None:
        """WARM -> BINDING: a Dial takes this warm stream (called with it out of the pool)."""
        self._require(StreamState.WARM, event="take")
        self.state = StreamState.BINDING
        self.traceparent = traceparent
        self.caller = caller if caller is not None else tunnel_pb2.Caller()
        self._taken.set()

    def bound(self) -> bool:
        """BINDING -> SPLICING once Chunk{bound} went out; False if the stream ended meanwhile."""
        if self.ended:
            return False
        self._require(StreamState.BINDING, event="bound")
        self.state = StreamState.SPLICING
        self._bound.set()
        return True

    def join(self, client: ByteStream) -> bool:
        """SPLICING: the Dial hands over its own stream for the Accept handler to pump toward the agent;
        False if the stream ended meanwhile."""
        if self.ended:
            return False
        self._require(StreamState.SPLICING, event="join")
        if self.client is not None:
            raise IllegalTransition("join of a joined stream")
        self.client = client
        self._joined.set()
        return True

    def forwarded(self, error: PeerGone | None) -> None:
        """The Accept handler's pump toward the agent is over: at the client's EOF (None) or broken."""
        self.forward_error = error
        self._forwarded.set()

    def end(self, reason: StreamEnd) -> bool:
        """Any state -> ENDED(reason); False (and the first reason kept) if it had ended already."""
        if self.ended:
            return False
        if reason is StreamEnd.CLEAN:
            self._require(StreamState.SPLICING, event="a clean end")
        if reason is StreamEnd.UNUSED:
            self._require(StreamState.WARM, event="UNUSED end")
        self.state = StreamState.ENDED
        self.end_reason = reason
        for event in (self._taken, self._bound, self._joined, self._forwarded, self._ended):
            event.set()
        return True

    # -- waiting --------------------------------------------------------------------------------

    async def wait_taken(self) -> bool:
        """The Accept handler: True once a Dial took this warm stream and it needs binding; False for a
        stream that needs none (a requested one) or that ended first."""
        await self._taken.wait()
        return self.state is StreamState.BINDING

    async def wait_bound(self) -> bool:
        """The Dial that took a warm stream: True once it may splice, False if the stream ended."""
        await self._bound.wait()
        return self.state is StreamState.SPLICING

    async def wait_joined(self) -> ByteStream | None:
        """The Accept handler: the client's stream to pump toward the agent, or None if the stream ended."""
        await self._joined.wait()
        return None if self.ended else self.client

    async def wait_forwarded(self) -> None:
        """The Dial: returns once the client -> agent direction is over (or the stream ended, which the
        Dial hears from wait_ended); raises the PeerGone that broke it."""
        await self._forwarded.wait()
        if self.forward_error is not None:
            raise self.forward_error

    async def wait_ended(self) -> StreamEnd:
        await self._ended.wait()
        assert self.end_reason is not None
        return self.end_reason


class DialState(enum.Enum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    ABANDONED = "abandoned"
    ORPHANED = "orphaned"


class SessionGone(Exception):
    """The agent's session ended before it answered the DialRequest (it moved to another replica after a
    drain, or disconnected): nothing reached the client yet, so the Dial may go where the agent is now."""


class PendingDial:
    """A Dial that asked the agent for an Accept stream (a DialRequest) and waits for it."""

    def __init__(self, dial_id: str) -> None:
        self.dial_id = dial_id
        self.state = DialState.PENDING
        self.accepted: AcceptedStream | None = None
        self._answered = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PendingDial {self.dial_id} {self.state.name}>"

    def accept(self, stream: ByteStream) -> AcceptedStream:
        """PENDING -> ACCEPTED: the agent's Accept for this dial id arrived."""
        if self.state is not DialState.PENDING:
            raise IllegalTransition(f"accept in state {self.state.name}")
        self.state = DialState.ACCEPTED
        self.accepted = AcceptedStream.requested(stream)
        self._answered.set()
        return self.accepted

    def abandon(self) -> None:
        """-> ABANDONED: the Dial gave up (timeout, cancelled). A stream accepted just before ends too."""
        if self.state is DialState.ABANDONED:
            raise IllegalTransition("abandon in state ABANDONED")
        if self.accepted is not None:
            self.accepted.end(StreamEnd.ABANDONED)
        self.state = DialState.ABANDONED
        self._answered.set()

    def orphan(self) -> None:
        """PENDING -> ORPHANED: the session it was asked of ended; the agent will not answer it there."""
        if self.state is not DialState.PENDING:
            raise IllegalTransition(f"orphan in state {self.state.name}")
        self.state = DialState.ORPHANED
        self._answered.set()

    async def wait_accepted(self, timeout: float) -> AcceptedStream:
        """The agent's stream; TimeoutError if it did not come within ``timeout`` seconds, SessionGone if
        its session ended first."""
        async with asyncio.timeout(timeout):
            await self._answered.wait()
        if self.state is DialState.ORPHANED:
            raise SessionGone(f"dial {self.dial_id}: the agent's session ended before it answered")
        if self.accepted is None:
            raise IllegalTransition("waited on an abandoned dial")
        return self.accepted


class PendingDials:
    """dial id -> the Dial waiting for it. A session replaced by a newer one hands this table on."""

    def __init__(self) -> None:
        self._dials: dict[str, PendingDial] = {}

    def __len__(self) -> int:
        return len(self._dials)

    def new(self) -> PendingDial:
        dial = PendingDial(uuid.uuid4().hex)
        self._dials[dial.dial_id] = dial
        return dial

    def accept(self, dial_id: str, stream: ByteStream) -> AcceptedStream | None:
        """The Accept for ``dial_id``, or None if no Dial waits for it (unknown, timed out, answered)."""
        dial = self._dials.pop(dial_id, None)
        if dial is None or dial.state is not DialState.PENDING:
            return None
        return dial.accept(stream)

    def forget(self, dial: PendingDial) -> None:
        """The Dial is done waiting, however that went."""
        if self._dials.get(dial.dial_id) is dial:
            del self._dials[dial.dial_id]

    def orphan_all(self) -> None:
        """The session that owns this table ended (and did not hand it on): every waiting Dial hears so now,
        rather than after the Accept timeout."""
        dials, self._dials = self._dials, {}
        for dial in dials.values():
            if dial.state is DialState.PENDING:
                dial.orphan()
