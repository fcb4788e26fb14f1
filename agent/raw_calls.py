"""The agent's calls, with Accept and Serve raw: it splices serialized Chunks without decoding them.

The payload of a connection's Chunks is not the agent's business, so each message goes on as the
bytes it came as (the relay does the same, relay/datapath/passthrough.py). That saves a parse and a
serialization, each a copy of the block, per message and direction: `bench/cpu_profile.py` in
docs/performance.md. Only two messages are the agent's own: a warm Accept's first (Chunk{bound},
parsed in session.py) and a Serve's first (the binding, serialized there).

End of stream: the relay and the auth proxy are the servers of these calls and cannot half-close,
so they say it in-band with Chunk{eof}. It ends that direction here and becomes ``done_writing`` on
the other call, as it did decoded. Byte counters count the serialized Chunks, as the relay's do.
"""

from __future__ import annotations

from typing import Any

import grpc

from clusterconnect.streams import GrpcClientStream
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

ACCEPT = "/clusterconnect.v1.AgentTunnel/Accept"
SERVE = "/clusterconnect.v1.AuthProxy/Serve"

# Chunk{eof} as both servers serialize it (protobuf's encoding of one field is deterministic).
EOF_CHUNK = tunnel_pb2.Chunk(eof=True).SerializeToString()

RawMethod = grpc.aio.StreamStreamMultiCallable[bytes, bytes]

# Both raw methods are registered as the generated stubs register theirs (``_registered_method``,
# which grpc's typing leaves out): core looks each method up once, not per call.


class RawChunkStream(GrpcClientStream):
    """A GrpcClientStream whose messages are the bytes of serialized Chunks."""

    def decode(self, message: Any) -> bytes | None:
        return None if message == EOF_CHUNK else message

    def encode(self, data: bytes) -> object:
        return data


class RelayCalls:
    """AgentTunnel at the relay: Connect with its messages, Accept raw."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Connect = tunnel_pb2_grpc.AgentTunnelStub(channel).Connect
        self.Accept: RawMethod = channel.stream_stream(ACCEPT, _registered_method=True)  # type: ignore[call-arg]


class AuthProxyCalls:
    """AuthProxy: Info with its messages, Serve raw."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Info = tunnel_pb2_grpc.AuthProxyStub(channel).Info
        self.Serve: RawMethod = channel.stream_stream(SERVE, _registered_method=True)  # type: ignore[call-arg]
