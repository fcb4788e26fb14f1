"""The agent's reconnect loop (agent/session.py) with stand-in sessions: whatever ends a session, the
next one follows; only cancellation ends the loop, and it leaves no task behind."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from clusterconnect.agent import session as agent_session
from clusterconnect.agent.backoff import Backoff
from clusterconnect.agent.session import Agent, AgentConfig

DEADLINE = 10.0


class _Enrolled:
    """Renewals that never come (the real ones are tested in test_agent_identity.py)."""

    async def renew_forever(self) -> None:
        await asyncio.Future()


class ScriptedAgent(Agent):
    """Each session raises the next failure of the script; once the script is done, a session stays up."""

    def __init__(self, failures: list[BaseException]) -> None:
        super().__init__(AgentConfig(cluster="c", enrolled=_Enrolled(), authproxy=None))  # type: ignore[arg-type]  # stand-ins: no relay, no auth proxy
        self.failures = failures
        self.attempts = 0
        self.up = asyncio.Event()

    async def _session(self, handover: asyncio.Event) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.up.set()
        await asyncio.Future()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(agent_session, "Backoff", lambda: Backoff(base=0.01, cap=0.05))


async def _run_until_up(agent: ScriptedAgent) -> asyncio.Task[None]:
    loop = asyncio.create_task(agent.run_forever())
    async with asyncio.timeout(DEADLINE):
        await agent.up.wait()
    assert not loop.done()
    return loop


async def _cancel_leaves_nothing(loop: asyncio.Task[None]) -> None:
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.parametrize("failure", [
    grpc.aio.UsageError("RPC already finished"),
    OSError(30, "Read-only file system"),
    asyncio.InvalidStateError("invalid state"),
    RuntimeError("anything else"),
], ids=lambda exc: type(exc).__name__)
def test_any_failure_of_a_session_reconnects(failure):
    async def scenario() -> None:
        agent = ScriptedAgent([failure, failure])
        loop = await _run_until_up(agent)
        assert agent.attempts == 3
        await _cancel_leaves_nothing(loop)

    asyncio.run(scenario())


def test_a_handed_over_session_keeps_running_until_cancelled():
    async def scenario() -> None:
        draining = asyncio.Event()
        old_cancelled = asyncio.Event()

        class HandingOver(ScriptedAgent):
            async def _session(self, handover: asyncio.Event) -> None:
                self.attempts += 1
                if self.attempts == 1:
                    handover.set()  # as _hand_over_on does once the certificate was renewed
                    draining.set()
                    try:
                        await asyncio.Future()  # finishing its connections
                    finally:
                        old_cancelled.set()
                self.up.set()
                await asyncio.Future()

        agent = HandingOver([])
        loop = await _run_until_up(agent)
        assert agent.attempts == 2 and draining.is_set() and not old_cancelled.is_set()
        await _cancel_leaves_nothing(loop)
        assert old_cancelled.is_set()

    asyncio.run(scenario())
