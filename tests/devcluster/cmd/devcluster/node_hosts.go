package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// There is no cluster DNS and no kube-proxy, and every pod is at 127.0.0.1:
// a Service whose port equals its target port is therefore reached at
// 127.0.0.1 on that port. Each container gets its own /etc/hosts (as a
// kubelet manages a pod's /etc/hosts) naming every Service as cluster DNS
// would (NAME.NS.svc, NAME.NS.svc.cluster.local, NAME.NS, and NAME for the
// pod's own namespace), so a chart's "reach my Service by name" works. It is
// written before every container start, from the Services existing then.

const hostsFile = "etc-hosts"

// serviceHosts is the node's /etc/hosts followed by one line per Service.
func serviceHosts(base []byte, services []corev1.Service, podNamespace string) []byte {
	var out bytes.Buffer
	out.Write(base)
	if len(base) > 0 && base[len(base)-1] != '\n' {
		out.WriteByte('\n')
	}
	out.WriteString("# Services of the devcluster (devcluster node)\n")
	names := make([]string, 0, len(services))
	for _, s := range services {
		n := fmt.Sprintf("%s.%s.svc %s.%s.svc.cluster.local %s.%s", s.Name, s.Namespace, s.Name, s.Namespace, s.Name, s.Namespace)
		if s.Namespace == podNamespace {
			n += " " + s.Name
		}
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&out, "127.0.0.1 %s\n", n)
	}
	return out.Bytes()
}

// writeHosts writes the pod's hosts file (bind-mounted at /etc/hosts).
func (pr *podRuntime) writeHosts() error {
	pr.mu.Lock()
	ns := pr.pod.Namespace
	pr.mu.Unlock()
	ctx, cancel := context.WithTimeout(pr.a.ctx, 10*time.Second)
	defer cancel()
	list, err := pr.a.cs.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list services for /etc/hosts: %w", err)
	}
	base, err := os.ReadFile("/etc/hosts")
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	path := filepath.Join(pr.dir, hostsFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, serviceHosts(base, list.Items, ns), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func (pr *podRuntime) hostsMount() bindMount {
	return bindMount{Source: filepath.Join(pr.dir, hostsFile), Target: "/etc/hosts", ReadOnly: true}
}
