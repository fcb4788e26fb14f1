"""clusterconnect: code shared by the relay, the agent, the auth proxy and the client proxy."""

__version__ = "0.1.0"
