"""clusterconnect-gateway: kubectl with only a kubeconfig reaches a cluster (no local proxy)."""
