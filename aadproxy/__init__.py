"""The auth proxy: authenticates each HTTP request and forwards it to the kube-apiserver."""
