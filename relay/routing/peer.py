"""RelayPeer: a Dial forwarded from the replica it reached to the replica that holds the agent.

The entry replica authenticates and authorizes the Dial, finds the owner in its route index and
opens ``RelayPeer.Forward`` to it: one stream per connection, like every other hop, so HTTP/2
flow control and head-of-line immunity hold across replicas too. Both ends move serialized Chunks
untouched (the methods are registered without (de)serializers), and the owner's answer — its
initial metadata once the agent accepted, or a status — is passed on to the client unchanged.

Peers authenticate each other with mutual TLS: certificates of the relay-peer CA, which the
replicas share and nothing else trusts (an agent's or a user's certificate never opens this port).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import grpc

from clusterconnect import metadata as md
from clusterconnect.errors import ClusterConnectError
from clusterconnect.grpc_options import CHANNEL_OPTIONS
from clusterconnect.streams import GrpcClientStream, PeerGone

FORWARD = "/clusterconnect.v1.RelayPeer/Forward"
SERVICE = "clusterconnect.v1.RelayPeer"
# The owner answers within its own Accept timeout (5 s) plus a network round trip.
OPEN_TIMEOUT = 7.0


@dataclass(frozen=True)
class PeerTLS:
    """PEM bytes: the relay-peer CA, and this replica's certificate (server and client auth) and key."""

    ca: bytes
    cert: bytes
    key: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


class RawClientStream(GrpcClientStream):
    """A ByteStream over a Forward call opened by this replica: messages are serialized Chunks, passed
    on as they are (see relay/datapath/passthrough.py for the server side). The far end's Chunk{eof}
    is one of them: it ends the client's stream at the client, not here."""

    def decode(self, message: Any) -> bytes:
        return cast(bytes, message)

    def encode(self, data: bytes) -> bytes:
        return data


class PeerRefused(ClusterConnectError):
    """The owner ended the Forward before opening it: its status, message and clusterconnect-reason
    are the client's answer."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.grpc_status = code
        self.details = details
        self.reason = reason


def _answer(peer: str, code: grpc.StatusCode, details: str | None, reason: str) -> Exception:
    """What a Forward that ended unopened means. Every refusal of an owner carries its clusterconnect-reason
    (relay/datapath/tunnel.py); UNAVAILABLE without one is the transport's: the peer is gone (a replica
    killed before its lease ran out), and the entry replica looks for the cluster's next route."""
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        return PeerGone(f"relay replica {peer} unreachable: {details or 'no answer'}")
    if code == grpc.StatusCode.OK:
        return PeerGone(f"relay replica {peer} ended the connection before opening it")
    return PeerRefused(code, details or "relay replica refused the connection", reason)


def _refused(peer: str, exc: grpc.aio.AioRpcError) -> Exception:
    return _answer(peer, exc.code(), exc.details(), _reason(exc.trailing_metadata()))


def _reason(metadata: object) -> str:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == md.REASON and isinstance(value, str):
            return value
    return ""


class PeerDialer:
    """Channels to the other replicas (one per peer address, opened on first use, kept)."""

    def __init__(self, tls: PeerTLS, server_name: str | None = None) -> None:
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Peers' certificates name their peer addresses; tests on loopback share one name.
        self._server_name = server_name

    def _channel(self, peer: str) -> grpc.aio.Channel:
        channel = self._channels.get(peer)
        if channel is None:
            options = list(CHANNEL_OPTIONS)
            if self._server_name:
                options.append(("grpc.ssl_target_name_override", self._server_name))
            channel = grpc.aio.secure_channel(peer, self._tls.channel_credentials(), options=options)
            self._channels[peer] = channel
        return channel

    async def forward(self, peer: str, cluster: str, traceparent: str = "", caller: bytes = b"",
                      expires_unix: float | None = None) -> RawClientStream:
        """Open a Forward to ``peer`` and wait until the owner says the path is open. ``caller`` is the
        serialized Caller the entry replica verified and ``expires_unix`` when its token expires: the
        owner passes the one to the agent and ends the connection at the other.
        Raises PeerRefused with the owner's status, or PeerGone when the peer cannot be reached."""
        metadata: list[tuple[str, str | bytes]] = [(md.CLUSTER, cluster), (md.CALLER_BIN, caller)]
        if expires_unix is not None:
            metadata.append((md.EXPIRES, repr(float(expires_unix))))
        if traceparent:
            metadata.append((md.TRACEPARENT, traceparent))
        # No (de)serializers: bytes through.
        multicallable: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self._channel(peer).stream_stream(FORWARD)
        call = multicallable(metadata=tuple(metadata))
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                initial = await call.initial_metadata()
        except TimeoutError:
            call.cancel()
            raise PeerGone(f"relay replica {peer} did not open the connection within {OPEN_TIMEOUT:g}s") from None
        except grpc.aio.AioRpcError as exc:
            raise _refused(peer, exc) from None
        if not any(key == md.OPEN for key, _ in (initial or ())):
            # No "open": the owner ended the call with a status; that status is the answer.
            try:
                code = await call.code()
                details = await call.details()
                trailing = await call.trailing_metadata()
            except grpc.aio.AioRpcError as exc:
                raise _refused(peer, exc) from None
            raise _answer(peer, code, details, _reason(trailing))
        return RawClientStream(call)


    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
