"""The agent: runs in the cluster, keeps one outbound stream to the relay, carries connections to the auth proxy."""
