"""Dial a real relay as a client proxy does (ClientTunnel.Dial over gRPC/TLS) and return its verdict on a
token: for a cluster without a connected agent, UNAVAILABLE means the token passed the access check, and
UNAUTHENTICATED or PERMISSION_DENIED that it did not."""

from __future__ import annotations

import asyncio

import grpc
from chain import Chain

from clusterconnect import metadata as md
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.v1 import tunnel_pb2_grpc


async def _dial(chain: Chain, cluster: str, token: str) -> tuple[grpc.StatusCode, str]:
    credentials = grpc.ssl_channel_credentials(root_certificates=chain.relay_ca.read_bytes())
    async with grpc.aio.secure_channel(grpc_target(chain.relay_url), credentials, options=CHANNEL_OPTIONS) as channel:
        call = tunnel_pb2_grpc.ClientTunnelStub(channel).Dial(metadata=((md.CLUSTER, cluster), bearer(token)),
                                                              timeout=15)
        code = await call.code()
        return code, await call.details() or ""


def dial_status(chain: Chain, cluster: str, token: str) -> tuple[grpc.StatusCode, str]:
    """(status, details) of a Dial of ``cluster`` with ``token``, ended by the relay."""
    return asyncio.run(_dial(chain, cluster, token))
