"""The agent leaving a draining relay (agent/session.py): once its next session is welcomed it says goodbye
on the old control stream and goes on serving that session until the relay ends it. A Dial at the relay
may take one of the old session's warm streams until the relay has read the goodbye; that connection is
carried. The interleaving is forced here with a scripted relay and auth proxy, since a fleet meets it
only by chance (tests/test_relay_forwarding.py's rolling restart: 2 of 509 connections, CI 2026-12-03,
opened and closed unanswered while the agent cancelled its warm streams)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc

from clusterconnect import metadata as md
from clusterconnect.agent.raw_calls import AuthProxyCalls
from clusterconnect.agent.session import Agent, AgentConfig
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

DEADLINE = 10.0


class _Enrolled:
    """The relay's address and channel credentials for the agent (local: the relay here is a stand-in)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.identity = SimpleNamespace(serial=1)
        self.rotated = asyncio.Event()  # no renewal comes

    async def use_relay(self, index: int) -> str:
        return self.target

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.local_channel_credentials()

    async def renew_forever(self) -> None:
        await asyncio.Future()


class DrainingRelay(tunnel_pb2_grpc.AgentTunnelServicer):
    """Session 1: welcome, wait for its two warm streams, Drain. When the agent's goodbye arrives (its
    control stream half-closed), a Dial takes a warm stream of that session: Chunk{bound}, then "ping";
    only then does the session end. Session 2 (the agent's next, as on another replica) stays up."""

    def __init__(self) -> None:
        self.sessions = 0
        self.warm_of_first: list[grpc.aio.ServicerContext] = []
        self.both_warm = asyncio.Event()
        self.goodbye = asyncio.Event()
        self.bound_sent = asyncio.Event()
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def Connect(self, request_iterator, context):
        self.sessions += 1
        hello = await context.read()
        assert hello.WhichOneof("message") == "hello"
        await context.write(tunnel_pb2.RelayMessage(welcome=tunnel_pb2.Welcome(heartbeat_seconds=60)))
        if self.sessions > 1:
            await asyncio.Future()  # the agent's next session: up until the test ends
        await self.both_warm.wait()
        await context.write(tunnel_pb2.RelayMessage(drain=tunnel_pb2.Drain(reason="replica stopping")))
        message = await context.read()
        assert message is grpc.aio.EOF, message  # the goodbye (no heartbeat is due within 60 s)
        self.goodbye.set()
        await self.bound_sent.wait()  # a Dial took a warm stream before the session ended here

    async def Accept(self, request_iterator, context):
        warm = dict(context.invocation_metadata()).get(md.WARM) == "1"
        if not warm or self.sessions > 1:
            await asyncio.Future()  # the next session's warm streams: not used here
        self.warm_of_first.append(context)
        if len(self.warm_of_first) == 2:
            self.both_warm.set()
        if context is not self.warm_of_first[0]:
            await asyncio.Future()
        await self.goodbye.wait()
        await context.write(tunnel_pb2.Chunk(bound=tunnel_pb2.Bound(caller=tunnel_pb2.Caller())))
        await context.write(tunnel_pb2.Chunk(data=b"ping"))
        self.bound_sent.set()
        answer = await context.read()
        self.reply.set_result(b"" if answer is grpc.aio.EOF else answer.data)


class EchoingAuthProxy(tunnel_pb2_grpc.AuthProxyServicer):
    """Answers each connection's first bytes with "pong:" and them."""

    async def Info(self, request, context):
        return tunnel_pb2.InfoResponse(kubernetes_version="v1.0.0")

    async def Serve(self, request_iterator, context):
        first = await context.read()
        assert first.HasField("bound"), first
        data = await context.read()
        await context.write(tunnel_pb2.Chunk(data=b"pong:" + data.data))
        await asyncio.Future()


def test_a_warm_stream_a_dial_takes_as_the_agent_leaves_a_draining_relay_is_carried():
    async def scenario() -> None:
        relay_impl, relay = DrainingRelay(), grpc.aio.server()
        tunnel_pb2_grpc.add_AgentTunnelServicer_to_server(relay_impl, relay)
        relay_port = relay.add_secure_port("127.0.0.1:0", grpc.local_server_credentials())
        authproxy = grpc.aio.server()
        tunnel_pb2_grpc.add_AuthProxyServicer_to_server(EchoingAuthProxy(), authproxy)
        authproxy_port = authproxy.add_insecure_port("127.0.0.1:0")
        await relay.start()
        await authproxy.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{authproxy_port}")
        agent = Agent(AgentConfig(cluster="c", enrolled=_Enrolled(f"127.0.0.1:{relay_port}"),  # type: ignore[arg-type]  # a stand-in
                                  authproxy=AuthProxyCalls(channel), warm_streams=2))
        running = asyncio.create_task(agent.run_forever())
        try:
            async with asyncio.timeout(DEADLINE):
                reply = await relay_impl.reply
            assert reply == b"pong:ping"
            assert relay_impl.sessions == 2
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await channel.close()
            await relay.stop(None)
            await authproxy.stop(None)

    asyncio.run(scenario())
