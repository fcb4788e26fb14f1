"""The clusterconnect-agent chart on the devcluster: the values and the volume it needs there.

Shared by `make demo` and the tests. The devcluster runs every pod on the host's network (all at
127.0.0.1), so one auth proxy (two would want one port) on a port of its own; and it has no volume
provisioner, so the agent's state claim binds a hostPath PersistentVolume made here, which the node
mounts (tests/devcluster/README.md).
"""

from __future__ import annotations

from pathlib import Path

from chain import free_port


def devcluster_values(authproxy_port: int) -> dict:
    # The metrics ports too (probes): on the host's network, a pod rolled by an upgrade must not meet the
    # one it replaces, nor a service of the test chain, on the chart's defaults.
    return {"authProxy": {"replicas": 1, "port": authproxy_port, "metricsPort": free_port()},
            "agent": {"metricsPort": free_port()}}


def state_volume(namespace: str, release: str, directory: Path) -> dict:
    """A hostPath PersistentVolume bound ahead to the chart's claim RELEASE-agent-state (so no other
    claim takes it); Retain, since the chart keeps the claim on uninstall."""
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{release}-agent-state"},
        "spec": {
            "capacity": {"storage": "16Mi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
            "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": namespace, "name": f"{release}-agent-state"},
        },
    }
