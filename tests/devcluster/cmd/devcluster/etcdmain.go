package main

import (
	"go.etcd.io/etcd/server/v3/etcdmain"
)

// runEtcdMain is upstream etcd's own main (the `etcd` binary), with every one of its flags: a
// member of a multi-member cluster with TLS and client certificates, as the relay's etcd store
// tests need (--name, --initial-cluster, --client-cert-auth, --trusted-ca-file, ...).
func runEtcdMain(args []string) {
	etcdmain.Main(append([]string{"etcd"}, args...))
}
