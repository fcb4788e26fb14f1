"""What the relay's gRPC handlers share: the context type of unary calls, and how a domain error
(a ``clusterconnect.errors.ClusterConnectError``) becomes the call's status."""

from __future__ import annotations

from typing import Any, Never, TypeAlias

import grpc
from google.protobuf.message import Message

from clusterconnect.errors import ClusterConnectError

UnaryContext: TypeAlias = grpc.aio.ServicerContext[Message, Message]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ClusterConnectError) -> Never:
    """End the call with the status the error's class carries and its one-line message."""
    await context.abort(error.grpc_status, str(error))
