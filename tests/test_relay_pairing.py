"""The Dial/Accept pairing state machines (relay/datapath/pairing.py) and the session pool, without sockets.

As h11 tests its _state.py: every state is reached the way the handlers reach it, then every event
is tried on it; the legal ones move it as documented and the others raise IllegalTransition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from clusterconnect.relay.datapath.pairing import (
    AcceptedStream,
    DialState,
    IllegalTransition,
    PendingDial,
    PendingDials,
    SessionGone,
    StreamEnd,
    StreamState,
)
from clusterconnect.relay.datapath.sessions import MAX_WARM, OUTBOX_SIZE, AgentSession, EndReason, SessionTable
from clusterconnect.streams import PeerGone

STREAM = object()  # the handlers' ByteStream; nothing here reads or writes it


def run(coroutine):
    return asyncio.run(coroutine)


def _in_state(state: StreamState) -> AcceptedStream:
    """A stream brought to ``state`` by the transitions the handlers use."""
    if state is StreamState.SPLICING:
        return AcceptedStream.requested(STREAM)
    accepted = AcceptedStream.warm(STREAM)
    if state in (StreamState.BINDING, StreamState.ENDED):
        accepted.take("00-trace")
    if state is StreamState.ENDED:
        accepted.end(StreamEnd.LOST)
    return accepted


# event name -> (the call, the state it leads to when legal)
_EVENTS: dict[str, tuple[Callable[[AcceptedStream], object], StreamState]] = {
    "take": (lambda s: s.take("00-trace"), StreamState.BINDING),
    "bound": (lambda s: s.bound(), StreamState.SPLICING),
    "join": (lambda s: s.join(STREAM), StreamState.SPLICING),
    **{f"end({end.name})": ((lambda s, end=end: s.end(end)), StreamState.ENDED) for end in StreamEnd},
}

# (state, event) pairs that are legal; every other pair raises, except the races listed below.
_LEGAL = {
    (StreamState.WARM, "take"),
    (StreamState.WARM, "end(ABANDONED)"), (StreamState.WARM, "end(LOST)"), (StreamState.WARM, "end(DROPPED)"),
    (StreamState.WARM, "end(UNUSED)"),
    (StreamState.BINDING, "bound"),
    (StreamState.BINDING, "end(ABANDONED)"), (StreamState.BINDING, "end(LOST)"), (StreamState.BINDING, "end(DROPPED)"),
    (StreamState.SPLICING, "join"), (StreamState.SPLICING, "end(CLEAN)"), (StreamState.SPLICING, "end(ABANDONED)"),
    (StreamState.SPLICING, "end(LOST)"), (StreamState.SPLICING, "end(DROPPED)"),
}
# Races between the two handlers: no transition, no error, the stream stays ENDED with its first reason.
_NO_OPS = {(StreamState.ENDED, "bound"), (StreamState.ENDED, "join")} | {
    (StreamState.ENDED, f"end({end.name})") for end in StreamEnd}


@pytest.mark.parametrize("state", list(StreamState), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(_EVENTS))
def test_every_event_in_every_state(state: StreamState, event: str) -> None:
    async def scenario() -> None:
        accepted = _in_state(state)
        call, target = _EVENTS[event]
        if (state, event) in _LEGAL:
            call(accepted)
            assert accepted.state is target
        elif (state, event) in _NO_OPS:
            assert call(accepted) is False
            assert accepted.state is StreamState.ENDED and accepted.end_reason is StreamEnd.LOST
        else:
            with pytest.raises(IllegalTransition):
                call(accepted)
            assert accepted.state is state  # an illegal event changes nothing

    run(scenario())


def test_a_stream_starts_warm_or_splicing_only() -> None:
    for state in (StreamState.BINDING, StreamState.ENDED):
        with pytest.raises(IllegalTransition):
            AcceptedStream(STREAM, state)


def test_a_warm_stream_goes_through_binding_to_a_clean_end() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.warm(STREAM)
        taken = asyncio.ensure_future(accepted.wait_taken())
        bound = asyncio.ensure_future(accepted.wait_bound())
        ended = asyncio.ensure_future(accepted.wait_ended())
        await asyncio.sleep(0)
        assert not (taken.done() or bound.done() or ended.done())
        accepted.take("00-abc")
        assert await taken is True and accepted.traceparent == "00-abc"
        await asyncio.sleep(0)
        assert not bound.done()  # the Dial may not splice before Chunk{bound} went out
        assert accepted.bound() is True
        assert await bound is True
        assert not ended.done()
        assert accepted.end(StreamEnd.CLEAN) is True
        assert await ended is StreamEnd.CLEAN

    run(scenario())


def test_a_requested_stream_needs_no_binding() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.requested(STREAM)
        assert await accepted.wait_taken() is False  # the Accept handler sends no Chunk{bound}
        assert await accepted.wait_bound() is True
        accepted.end(StreamEnd.CLEAN)
        assert await accepted.wait_ended() is StreamEnd.CLEAN

    run(scenario())


def test_the_dial_joins_and_hears_how_the_direction_toward_the_agent_ended() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.requested(STREAM)
        joined = asyncio.ensure_future(accepted.wait_joined())
        forwarded = asyncio.ensure_future(accepted.wait_forwarded())
        await asyncio.sleep(0)
        assert not joined.done()  # the Accept handler pumps nothing before the Dial gave its stream
        client = object()
        assert accepted.join(client) is True
        assert await joined is client
        with pytest.raises(IllegalTransition):
            accepted.join(client)
        await asyncio.sleep(0)
        assert not forwarded.done()
        accepted.forwarded(PeerGone("client gone"))
        with pytest.raises(PeerGone, match="client gone"):
            await forwarded
        assert accepted.state is StreamState.SPLICING  # the Dial ends it, with the reason it chooses

        clean = AcceptedStream.requested(STREAM)
        clean.join(client)
        clean.forwarded(None)
        assert await clean.wait_forwarded() is None

    run(scenario())


def test_a_stream_that_ends_before_the_dial_joins_gives_the_accept_handler_nothing_to_pump() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.requested(STREAM)
        joined = asyncio.ensure_future(accepted.wait_joined())
        await asyncio.sleep(0)
        accepted.end(StreamEnd.LOST)
        assert await joined is None
        assert accepted.join(object()) is False
        assert await accepted.wait_forwarded() is None  # the Dial hears the end from wait_ended

    run(scenario())


def test_the_first_end_reason_stays() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.requested(STREAM)
        assert accepted.end(StreamEnd.LOST) is True
        assert accepted.end(StreamEnd.CLEAN) is False  # the Dial's finally, after the agent's stream broke
        assert accepted.end_reason is StreamEnd.LOST and await accepted.wait_ended() is StreamEnd.LOST

    run(scenario())


def test_an_ending_stream_wakes_every_waiter() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.warm(STREAM)
        waiters = [asyncio.ensure_future(w) for w in (accepted.wait_taken(), accepted.wait_bound(),
                                                      accepted.wait_joined(), accepted.wait_forwarded(),
                                                      accepted.wait_ended())]
        await asyncio.sleep(0)
        accepted.end(StreamEnd.UNUSED)
        assert await asyncio.gather(*waiters) == [False, False, None, None, StreamEnd.UNUSED]

    run(scenario())


def test_dial_cancelled_while_the_agent_binds() -> None:
    """The Dial took a warm stream and was cancelled before Chunk{bound} went out: the Accept
    handler's bound() finds the stream ended and it ends its call as not clean."""
    async def scenario() -> None:
        accepted = AcceptedStream.warm(STREAM)
        accepted.take("00-abc")
        accepted.end(StreamEnd.ABANDONED)  # the Dial's cancellation
        assert accepted.bound() is False
        assert accepted.state is StreamState.ENDED and await accepted.wait_bound() is False
        assert await accepted.wait_ended() is StreamEnd.ABANDONED

    run(scenario())


def test_agent_stream_lost_while_binding() -> None:
    async def scenario() -> None:
        accepted = AcceptedStream.warm(STREAM)
        accepted.take("00-abc")
        dial_waits = asyncio.ensure_future(accepted.wait_bound())
        await asyncio.sleep(0)
        accepted.end(StreamEnd.LOST)  # Chunk{bound} could not be sent
        assert await dial_waits is False  # the Dial tries the next warm stream

    run(scenario())


# -- pending dials ------------------------------------------------------------------------------


def test_pending_dial_accepted() -> None:
    async def scenario() -> None:
        dials = PendingDials()
        dial = dials.new()
        assert dial.state is DialState.PENDING and len(dials) == 1
        waiting = asyncio.ensure_future(dial.wait_accepted(5))
        await asyncio.sleep(0)
        accepted = dials.accept(dial.dial_id, STREAM)
        assert accepted is not None and accepted.state is StreamState.SPLICING
        assert dial.state is DialState.ACCEPTED
        assert await waiting is accepted
        assert dials.accept(dial.dial_id, STREAM) is None  # a second Accept with the same id is refused
        dials.forget(dial)
        assert len(dials) == 0

    run(scenario())


def test_pending_dial_that_times_out_refuses_a_late_accept() -> None:
    async def scenario() -> None:
        dials = PendingDials()
        dial = dials.new()
        with pytest.raises(TimeoutError):
            await dial.wait_accepted(0.01)
        dial.abandon()
        dials.forget(dial)
        assert dial.state is DialState.ABANDONED
        assert dials.accept(dial.dial_id, STREAM) is None

    run(scenario())


def test_abandoned_dial_still_listed_refuses_the_accept() -> None:
    """The Dial was cancelled and abandoned its dial but had not yet forgotten it."""
    async def scenario() -> None:
        dials = PendingDials()
        dial = dials.new()
        dial.abandon()
        assert dials.accept(dial.dial_id, STREAM) is None
        assert dial.accepted is None

    run(scenario())


def test_dial_cancelled_just_as_accept_arrives() -> None:
    """The Accept answered, but the Dial is cancelled before it took the stream: the stream ends
    ABANDONED, so the Accept handler does not wait for ever."""
    async def scenario() -> None:
        dials = PendingDials()
        dial = dials.new()
        waiting = asyncio.ensure_future(dial.wait_accepted(5))
        await asyncio.sleep(0)
        accepted = dials.accept(dial.dial_id, STREAM)
        assert accepted is not None
        waiting.cancel()  # before the Dial's task ran again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        dial.abandon()  # what the Dial handler does on its way out
        assert dial.state is DialState.ABANDONED
        assert await accepted.wait_ended() is StreamEnd.ABANDONED

    run(scenario())


def test_pending_dial_illegal_transitions() -> None:
    async def scenario() -> None:
        accepted = PendingDial("a")
        accepted.accept(STREAM)
        with pytest.raises(IllegalTransition):
            accepted.accept(STREAM)
        abandoned = PendingDial("b")
        abandoned.abandon()
        with pytest.raises(IllegalTransition):
            abandoned.accept(STREAM)
        with pytest.raises(IllegalTransition):
            abandoned.abandon()
        with pytest.raises(IllegalTransition):
            await abandoned.wait_accepted(1)
        with pytest.raises(IllegalTransition):
            abandoned.orphan()
        orphaned = PendingDial("c")
        orphaned.orphan()
        for event in (lambda: orphaned.accept(STREAM), orphaned.orphan):
            with pytest.raises(IllegalTransition):
                event()

    run(scenario())


# -- sessions -----------------------------------------------------------------------------------


def test_agent_session_keeps_a_bounded_pool_of_warm_streams() -> None:
    async def scenario() -> None:
        session = AgentSession("dev", "v", "k")
        streams = [AcceptedStream.warm(STREAM) for _ in range(MAX_WARM + 1)]
        assert [session.add_warm(s) for s in streams] == [True] * MAX_WARM + [False]
        streams[0].end(StreamEnd.LOST)  # its agent stream died: never handed out
        taken = session.take_warm("00-abc")
        assert taken is streams[1] and taken.state is StreamState.BINDING  # oldest usable first
        session.discard_warm(streams[2])  # its Accept handler ended
        assert session.take_warm("00-abc") is streams[3]
        session.end(EndReason.DISCONNECTED)
        assert session.take_warm("00-abc") is None and not session.add_warm(AcceptedStream.warm(STREAM))
        # Warm streams that were still waiting are ended, so their Accept handlers end too.
        assert all(s.end_reason is StreamEnd.UNUSED for s in streams[4:MAX_WARM])
        # The ones a Dial had taken are the Dial's: the session leaves them alone.
        assert streams[1].state is StreamState.BINDING and streams[3].state is StreamState.BINDING

    run(scenario())


def test_only_a_warm_stream_joins_the_pool() -> None:
    async def scenario() -> None:
        with pytest.raises(IllegalTransition):
            AgentSession("dev", "v", "k").add_warm(AcceptedStream.requested(STREAM))

    run(scenario())


def test_a_session_that_ends_drops_its_connections() -> None:
    async def scenario() -> None:
        session = AgentSession("dev", "v", "k")
        splicing = AcceptedStream.requested(STREAM)
        session.active.add(splicing)
        warm = AcceptedStream.warm(STREAM)
        session.add_warm(warm)
        session.end(EndReason.CLUSTER_REMOVED)
        assert splicing.end_reason is StreamEnd.DROPPED and warm.end_reason is StreamEnd.UNUSED
        session.end(EndReason.DISCONNECTED)  # the Connect handler's finally
        assert session.end_reason is EndReason.CLUSTER_REMOVED  # the first reason stays

    run(scenario())


def test_a_replaced_session_keeps_its_connections_and_pending_dials() -> None:
    async def scenario() -> None:
        table = SessionTable()
        old = AgentSession("dev", "v1", "k")
        table.add(old)
        splicing = AcceptedStream.requested(STREAM)
        old.active.add(splicing)
        warm = AcceptedStream.warm(STREAM)
        old.add_warm(warm)
        dial = old.request_dial("00-abc")
        new = AgentSession("dev", "v2", "k")
        table.add(new)
        assert table.get("dev") is new
        assert old.ended.is_set() and old.end_reason is EndReason.REPLACED
        assert splicing.state is StreamState.SPLICING  # its connection goes on
        assert warm.end_reason is StreamEnd.UNUSED  # a warm stream of the old channel is not reused
        # The agent answers the DialRequest of the old session on its new connection.
        accepted = new.dials.accept(dial.dial_id, STREAM)
        assert accepted is not None and dial.state is DialState.ACCEPTED
        table.discard(old)  # the old Connect handler ends: the new session stays
        assert table.get("dev") is new

    run(scenario())


def test_dial_requests_of_a_replaced_session_go_to_the_newer_one() -> None:
    """Nobody reads a replaced session's outbox: a DialRequest queued there, or asked of it by a Dial that
    held it from before, would wait out the Accept timeout."""
    async def scenario() -> None:
        table = SessionTable()
        old = AgentSession("dev", "v1", "k")
        table.add(old)
        queued = old.request_dial("00-queued")
        old.drain("moving")  # a control message for the old channel only
        new = AgentSession("dev", "v2", "k")
        table.add(new)
        assert old.outbox.empty()
        moved = new.outbox.get_nowait()
        assert moved.WhichOneof("message") == "dial" and moved.dial.dial_id == queued.dial_id
        assert new.outbox.empty()  # the Drain stayed behind
        late = old.request_dial("00-late")
        assert old.outbox.empty() and new.outbox.get_nowait().dial.dial_id == late.dial_id
        assert new.dials.accept(late.dial_id, STREAM) is not None
        newest = AgentSession("dev", "v3", "k")
        table.add(newest)
        assert old.request_dial("00-later") and newest.outbox.qsize() == 1

    run(scenario())


def test_a_session_that_ends_lets_its_waiting_dials_go_at_once() -> None:
    """A drained agent leaves its session when its next one (on another replica) is welcomed: a Dial that asked
    the old one hears SessionGone at once (and goes where the agent is now), not after the Accept timeout;
    the agent's late Accept for it is refused."""
    async def scenario() -> None:
        session = AgentSession("dev", "v", "k")
        dial = session.request_dial("00-abc")
        waiting = asyncio.ensure_future(dial.wait_accepted(60))
        await asyncio.sleep(0)
        session.end(EndReason.DRAINED, drop_connections=False)
        with pytest.raises(SessionGone):
            await asyncio.wait_for(waiting, 1)
        assert dial.state is DialState.ORPHANED
        assert session.dials.accept(dial.dial_id, STREAM) is None

    run(scenario())


def test_a_replaced_session_that_ends_again_keeps_the_dials_it_handed_on() -> None:
    """Its Connect handler's end (AGENT_CLOSED, DISCONNECTED) comes after REPLACED: the newer session's dials,
    the same table, stay answerable."""
    async def scenario() -> None:
        table = SessionTable()
        old = AgentSession("dev", "v1", "k")
        table.add(old)
        dial = old.request_dial("00-abc")
        new = AgentSession("dev", "v2", "k")
        table.add(new)
        old.end(EndReason.AGENT_CLOSED)
        assert dial.state is DialState.PENDING
        assert new.dials.accept(dial.dial_id, STREAM) is not None

    run(scenario())


def test_a_dial_request_the_agent_cannot_take_leaves_no_pending_dial() -> None:
    async def scenario() -> None:
        session = AgentSession("dev", "v", "k")
        for _ in range(OUTBOX_SIZE):
            session.request_dial()
        assert len(session.dials) == OUTBOX_SIZE
        with pytest.raises(asyncio.QueueFull):
            session.request_dial()
        assert len(session.dials) == OUTBOX_SIZE
        message = session.outbox.get_nowait()
        assert message.dial.dial_id and session.dials.accept(message.dial.dial_id, STREAM) is not None

    run(scenario())
