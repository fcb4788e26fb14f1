"""What a RelayPeer.Forward carries in its metadata (peer.proto): the cluster, the caller the entry
replica verified, its token's expiry and the trace context. Read without trusting the peer more
than its certificate says: a malformed value is refused with one line, never a crash."""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from clusterconnect import metadata as md
from clusterconnect.grpc_options import Metadata, metadata_value
from clusterconnect.v1 import tunnel_pb2


@dataclass(frozen=True)
class ForwardRequest:
    cluster: str
    caller: tunnel_pb2.Caller
    expires_unix: float | None
    traceparent: str


def read_forward_metadata(metadata: Metadata) -> ForwardRequest | str:
    """The Forward's request, or what is wrong with it (one line)."""
    cluster = metadata_value(metadata, md.CLUSTER)
    if not cluster:
        return f"missing {md.CLUSTER} metadata"
    callers = [v for k, v in (metadata or ()) if k == md.CALLER_BIN]
    if len(callers) != 1 or not isinstance(callers[0], bytes):
        return f"missing {md.CALLER_BIN} metadata"
    caller = tunnel_pb2.Caller()
    try:
        caller.ParseFromString(callers[0])
    except DecodeError:
        return f"{md.CALLER_BIN} is not a serialized Caller"
    expires: float | None = None
    if (text := metadata_value(metadata, md.EXPIRES)) is not None:
        try:
            expires = float(text)
        except ValueError:
            return f"{md.EXPIRES} is not a number of seconds"
        if not math.isfinite(expires):
            return f"{md.EXPIRES} is not a number of seconds"
    return ForwardRequest(cluster, caller, expires, metadata_value(metadata, md.TRACEPARENT) or "")
