"""gRPC metadata keys of the clusterconnect protocol (see protos/clusterconnect/v1/tunnel.proto)."""

import enum

CLUSTER = "x-clusterconnect-cluster"
DIAL_ID = "x-clusterconnect-dial-id"
WARM = "x-clusterconnect-warm"  # on an Accept opened ahead of need (see tunnel.proto)
TRACEPARENT = "traceparent"
OPEN = "x-clusterconnect-open"  # initial metadata from the relay: the agent accepted the connection
REASON = "clusterconnect-reason"  # trailing metadata of a Dial the relay refused: a DialRefusal
# On RelayPeer.Forward (peer.proto): the caller the entry replica verified (a serialized Caller; gRPC
# carries "-bin" keys as bytes) and when its token expires (unix seconds), so the owner binds and ends it.
CALLER_BIN = "x-clusterconnect-caller-bin"
EXPIRES = "x-clusterconnect-expires"


class DialRefusal(enum.StrEnum):
    """Why the relay refused or could not open a Dial, so that a client need not read the message."""

    MISSING_CLUSTER = "missing-cluster"  # no cluster name in the request metadata
    MISSING_TOKEN = "missing-token"  # no bearer token in the request metadata
    CLUSTER_NOT_REGISTERED = "cluster-not-registered"  # older relays only: now ACCESS_DENIED, one answer for both
    TOKEN_REFUSED = "token-refused"  # a token of an issuer the relay trusts, but not valid
    ACCESS_DENIED = "access-denied"  # not on the cluster's access list
    AGENT_NOT_CONNECTED = "agent-not-connected"
    AGENT_OVERLOADED = "agent-overloaded"  # its control stream does not keep up
    AGENT_NOT_ANSWERING = "agent-not-answering"  # no Accept within the relay's ACCEPT_TIMEOUT
    CONNECTION_LOST = "connection-lost"  # the agent's stream of an open connection went away
    TOO_MANY_CONNECTIONS = "too-many-connections"  # the relay's limit per cluster or per identity
    ACCESS_REVOKED = "access-revoked"  # an open connection's identity was removed, revoked or expired
