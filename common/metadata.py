"""gRPC metadata keys of the clusterconnect protocol (see protos/clusterconnect/v1/tunnel.proto)."""

CLUSTER = "x-clusterconnect-cluster"
DIAL_ID = "x-clusterconnect-dial-id"
WARM = "x-clusterconnect-warm"  # on an Accept opened ahead of need (see tunnel.proto)
TRACEPARENT = "traceparent"
OPEN = "x-clusterconnect-open"  # initial metadata from the relay: the agent accepted the connection
