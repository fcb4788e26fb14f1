"""RelayPeer.Forward between two gRPC servers in this process, over real mutual TLS: bytes pass untouched
both ways with half-close, the owner's refusal reaches the entry replica as its status, and a peer
without a certificate of the relay-peer CA is never served."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from clusterconnect import metadata as md
from clusterconnect.grpc_options import metadata_value
from clusterconnect.pki import create_ca, issue_server_cert
from clusterconnect.relay.datapath.passthrough import PassthroughStream, raw_stream_handler
from clusterconnect.relay.routing.peer import SERVICE, PeerDialer, PeerRefused, PeerTLS
from clusterconnect.streams import PeerGone
from clusterconnect.v1 import tunnel_pb2


def _tls(ca) -> PeerTLS:
    pair = issue_server_cert(ca, ["localhost", "127.0.0.1"], client_auth=True)
    return PeerTLS(ca.cert_pem, pair.cert_pem, pair.key_pem)


async def _owner(_requests: object, context: grpc.aio.ServicerContext) -> None:
    """What an owner replica does, reduced to the protocol: open, then echo upper-cased until EOF."""
    cluster = metadata_value(context.invocation_metadata(), md.CLUSTER)
    if cluster != "here":
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"cluster {cluster} is not connected (agent never connected)",
                            trailing_metadata=((md.REASON, "agent-not-connected"),))
    await context.send_initial_metadata(((md.OPEN, "1"),))
    stream = PassthroughStream(context)
    while True:
        message = await stream.receive()
        if not message:
            break
        chunk = tunnel_pb2.Chunk.FromString(message)
        await stream.send(tunnel_pb2.Chunk(data=chunk.data.upper()).SerializeToString())
    await stream.send_eof()


def run(body) -> None:
    async def main() -> None:
        ca = create_ca("relay-peer CA")
        server_tls = _tls(ca)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((raw_stream_handler(SERVICE, {"Forward": _owner}),))
        port = server.add_secure_port("127.0.0.1:0", server_tls.server_credentials())
        await server.start()
        try:
            await body(ca, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


def test_forward_carries_bytes_both_ways_with_half_close():
    async def body(ca, peer: str) -> None:
        dialer = PeerDialer(_tls(ca), server_name="localhost")
        stream = await dialer.forward(peer, "here", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        for word in (b"get", b"pods"):
            await stream.send(tunnel_pb2.Chunk(data=word).SerializeToString())
            assert tunnel_pb2.Chunk.FromString(await stream.receive()).data == word.upper()
        await stream.send_eof()
        # The owner's in-band end of stream passes through as bytes, then the call ends.
        assert tunnel_pb2.Chunk.FromString(await stream.receive()).eof
        assert await stream.receive() == b""
        await dialer.close()

    run(body)


def test_the_owners_refusal_is_the_answer():
    async def body(ca, peer: str) -> None:
        dialer = PeerDialer(_tls(ca), server_name="localhost")
        with pytest.raises(PeerRefused) as refused:
            await dialer.forward(peer, "elsewhere")
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details == "cluster elsewhere is not connected (agent never connected)"
        assert refused.value.reason == "agent-not-connected"
        await dialer.close()

    run(body)


def test_a_peer_of_another_ca_is_not_served():
    async def body(ca, peer: str) -> None:
        stranger = PeerDialer(_tls(create_ca("someone else's CA")), server_name="localhost")
        with pytest.raises((PeerGone, PeerRefused)) as failed:
            await stranger.forward(peer, "here")
        if isinstance(failed.value, PeerRefused):
            assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        await stranger.close()

    run(body)
