"""Relay replicas on etcd: which replica holds each cluster's agent (routes on the replica's lease)."""
