"""gRPC metadata keys of the clusterconnect protocol (see protos/clusterconnect/v1/tunnel.proto)."""

CLUSTER = "x-clusterconnect-cluster"
DIAL_ID = "x-clusterconnect-dial-id"
TRACEPARENT = "traceparent"
OPEN = "x-clusterconnect-open"  # initial metadata from the relay: the agent accepted the connection
