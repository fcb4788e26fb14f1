"""clusterconnect: code shared by the relay, the agent, the auth proxy and the client proxy."""

import os

__version__ = "0.1.0"

# gRPC's C core logs to stderr on its own, at INFO for events our code already reports (a failed TLS
# handshake: the caller gets UNAVAILABLE and says why in one JSON line), and such plain-text lines
# break a log of JSON lines. Its errors still show; GRPC_VERBOSITY=INFO or DEBUG brings the rest back.
# (Set here, before any module imports grpc: the C core reads it once, at import.)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
