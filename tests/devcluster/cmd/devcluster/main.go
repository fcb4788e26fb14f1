// Command devcluster is a multi-call binary that runs a small, real Kubernetes
// control plane (etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler) plus a process-based fake node, all on 127.0.0.1.
//
//	devcluster run --state-dir DIR           launcher (starts everything)
//	devcluster etcd ARGS                     embedded etcd
//	devcluster etcdmain ARGS                 upstream etcd, all its flags
//	devcluster kube-apiserver ARGS           upstream kube-apiserver
//	devcluster kube-controller-manager ARGS  upstream kube-controller-manager
//	devcluster kube-scheduler ARGS           upstream kube-scheduler
//	devcluster node ARGS                     process-based node ("kubelet")
//	devcluster container-init MOUNTS PATH ARGV  (internal) a container's mounts, then exec
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	schedulerapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage: devcluster SUBCOMMAND [ARGS]

subcommands:
  run --state-dir DIR            start a complete dev cluster (foreground)
  etcd ARGS                      embedded etcd
  etcdmain ARGS                  upstream etcd (all of its flags: multi-member, TLS)
  kube-apiserver ARGS            kube-apiserver
  kube-controller-manager ARGS   kube-controller-manager
  kube-scheduler ARGS            kube-scheduler
  node ARGS                      process-based node agent
`)
}

func runCobra(cmd *cobra.Command, args []string) {
	cmd.SetArgs(args)
	os.Exit(cli.Run(cmd))
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	sub, args := os.Args[1], os.Args[2:]
	switch sub {
	case "run":
		os.Exit(runLauncher(args))
	case "etcd":
		os.Exit(runEtcd(args))
	case "etcdmain":
		runEtcdMain(args)
	case "kube-apiserver":
		runCobra(apiserverapp.NewAPIServerCommand(), args)
	case "kube-controller-manager":
		runCobra(kcmapp.NewControllerManagerCommand(), args)
	case "kube-scheduler":
		runCobra(schedulerapp.NewSchedulerCommand(), args)
	case "node":
		os.Exit(runNode(args))
	case "container-init":
		os.Exit(runContainerInit(args))
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "devcluster: unknown subcommand %q\n", sub)
		usage()
		os.Exit(2)
	}
}
