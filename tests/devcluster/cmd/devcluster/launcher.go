package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const defaultNodeName = "devnode"

// child is one component process started by the launcher.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func freePorts(n int) ([]int, error) {
	// Keep all listeners open until every port has been chosen so that we
	// never hand out the same port twice.
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// tailFile returns the last n lines of a file.
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func writeKubeconfig(path, server, caFile, certFile, keyFile, user string, embed bool) error {
	cfg := clientcmdapi.NewConfig()
	cluster := clientcmdapi.NewCluster()
	cluster.Server = server
	auth := clientcmdapi.NewAuthInfo()
	if embed {
		ca, err := os.ReadFile(caFile)
		if err != nil {
			return err
		}
		cert, err := os.ReadFile(certFile)
		if err != nil {
			return err
		}
		key, err := os.ReadFile(keyFile)
		if err != nil {
			return err
		}
		cluster.CertificateAuthorityData = ca
		auth.ClientCertificateData = cert
		auth.ClientKeyData = key
	} else {
		cluster.CertificateAuthority = caFile
		auth.ClientCertificate = certFile
		auth.ClientKey = keyFile
	}
	cfg.Clusters["devcluster"] = cluster
	cfg.AuthInfos[user] = auth
	ctx := clientcmdapi.NewContext()
	ctx.Cluster = "devcluster"
	ctx.AuthInfo = user
	cfg.Contexts[user+"@devcluster"] = ctx
	cfg.CurrentContext = user + "@devcluster"
	return clientcmd.WriteToFile(*cfg, path)
}

const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
`

type launcher struct {
	stateDir string
	logDir   string
	self     string

	mu       sync.Mutex
	children []*child
	died     chan *child
}

func (l *launcher) start(name string, args ...string) (*child, error) {
	logPath := filepath.Join(l.logDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(l.self, append([]string{name}, args...)...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Stdin = nil
	cmd.Dir = l.stateDir
	cmd.Env = append(os.Environ(), "DEVCLUSTER_STATE_DIR="+l.stateDir)
	// Children stay in the launcher's process group (so killing the group
	// kills everything); Pdeathsig is a safety net when the launcher is
	// SIGKILLed. The launcher spawns all children from the main OS thread
	// (LockOSThread in runLauncher) because Pdeathsig tracks the thread.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	l.mu.Lock()
	l.children = append(l.children, c)
	l.mu.Unlock()
	go func() {
		c.err = cmd.Wait()
		f.Close()
		close(c.done)
		select {
		case l.died <- c:
		default:
		}
	}()
	return c, nil
}

// stopAll stops the children in dependency order (node and controllers
// first, then the apiserver, then etcd): SIGTERM, then SIGKILL after grace.
// Stopping etcd together with the apiserver would make the apiserver hang
// in its graceful shutdown.
func (l *launcher) stopAll(grace time.Duration) {
	l.mu.Lock()
	children := append([]*child(nil), l.children...)
	l.mu.Unlock()
	byName := map[string]*child{}
	for _, c := range children {
		byName[c.name] = c
	}
	groups := [][]string{
		{"node", "kube-scheduler", "kube-controller-manager"},
		{"kube-apiserver"},
		{"etcd"},
	}
	for _, g := range groups {
		var cs []*child
		for _, n := range g {
			if c := byName[n]; c != nil {
				cs = append(cs, c)
				_ = c.cmd.Process.Signal(syscall.SIGTERM)
			}
		}
		deadline := time.Now().Add(grace)
		for _, c := range cs {
			select {
			case <-c.done:
			case <-time.After(time.Until(deadline)):
				fmt.Fprintf(os.Stderr, "devcluster run: %s did not stop within %s, killing it\n", c.name, grace)
				_ = c.cmd.Process.Signal(syscall.SIGKILL)
				<-c.done
			}
		}
	}
}

func describeExit(c *child) string {
	state := "exited"
	if c.cmd.ProcessState != nil {
		state = c.cmd.ProcessState.String()
	}
	return fmt.Sprintf("devcluster: component %s exited unexpectedly (%s); last lines of %s:\n%s",
		c.name, state, c.logPath, tailFile(c.logPath, 40))
}

// killProcsUnder kills every process whose cwd is inside dir (left-over pod
// processes, e.g. when the node was SIGKILLed).
func killProcsUnder(dir string) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	me := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == me {
			continue
		}
		cwd, err := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		if err != nil {
			continue
		}
		if cwd == dir || strings.HasPrefix(cwd, dir+"/") {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func runLauncher(args []string) int {
	// All children are forked from this (main) OS thread, see start().
	runtime.LockOSThread()

	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	stateDir := fs.String("state-dir", "", "directory for all state, logs, kubeconfig (required)")
	timeout := fs.Duration("timeout", 120*time.Second, "how long to wait for the cluster to become ready")
	nodeName := fs.String("node-name", defaultNodeName, "name of the node")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *stateDir == "" {
		fmt.Fprintln(os.Stderr, "devcluster run: --state-dir is required")
		return 2
	}
	dir, err := filepath.Abs(*stateDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "devcluster run: %v\n", err)
		return 2
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "devcluster run: %v\n", err)
		return 1
	}
	t0 := time.Now()
	l := &launcher{stateDir: dir, logDir: filepath.Join(dir, "logs"), self: self, died: make(chan *child, 16)}

	// Stale state from a previous run would only confuse things.
	for _, d := range []string{"etcd", "pki", "pods", "logs"} {
		_ = os.RemoveAll(filepath.Join(dir, d))
	}
	for _, d := range []string{dir, l.logDir, filepath.Join(dir, "pods")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "devcluster run: %v\n", err)
			return 1
		}
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)

	code := func() int {
		fail := func(format string, a ...any) int {
			fmt.Fprintf(os.Stderr, "devcluster run: "+format+"\n", a...)
			return 1
		}
		p, err := generatePKI(filepath.Join(dir, "pki"), *nodeName)
		if err != nil {
			return fail("generating PKI: %v", err)
		}
		ports, err := freePorts(6)
		if err != nil {
			return fail("picking ports: %v", err)
		}
		etcdClient, etcdPeer, apiPort, kcmPort, schedPort, kubeletPort := ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]
		server := fmt.Sprintf("https://127.0.0.1:%d", apiPort)

		kubeconfig := filepath.Join(dir, "kubeconfig")
		caFile := filepath.Join(dir, "ca.crt")
		caData, _ := os.ReadFile(p.CACert)
		if err := os.WriteFile(caFile, caData, 0o644); err != nil {
			return fail("%v", err)
		}
		kcmKubeconfig := filepath.Join(p.Dir, "kube-controller-manager.kubeconfig")
		schedKubeconfig := filepath.Join(p.Dir, "kube-scheduler.kubeconfig")
		nodeKubeconfig := filepath.Join(p.Dir, "node.kubeconfig")
		for _, kc := range []struct{ path, cert, key, user string }{
			{kcmKubeconfig, p.KCMCert, p.KCMKey, "system:kube-controller-manager"},
			{schedKubeconfig, p.SchedulerCert, p.SchedulerKey, "system:kube-scheduler"},
			{nodeKubeconfig, p.NodeCert, p.NodeKey, "system:node:" + *nodeName},
		} {
			if err := writeKubeconfig(kc.path, server, p.CACert, kc.cert, kc.key, kc.user, false); err != nil {
				return fail("writing %s: %v", kc.path, err)
			}
		}
		// The admin kubeconfig is only written once the cluster is ready.
		adminKubeconfigTmp := filepath.Join(p.Dir, "admin.kubeconfig")
		if err := writeKubeconfig(adminKubeconfigTmp, server, p.CACert, p.AdminCert, p.AdminKey, "kubernetes-admin", true); err != nil {
			return fail("writing admin kubeconfig: %v", err)
		}
		auditPolicyPath := filepath.Join(dir, "audit-policy.yaml")
		if err := os.WriteFile(auditPolicyPath, []byte(auditPolicy), 0o644); err != nil {
			return fail("%v", err)
		}
		auditLog := filepath.Join(l.logDir, "audit.log")

		// etcd
		etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
		if _, err := l.start("etcd",
			"--data-dir="+filepath.Join(dir, "etcd"),
			"--client-url="+etcdURL,
			fmt.Sprintf("--peer-url=http://127.0.0.1:%d", etcdPeer)); err != nil {
			return fail("%v", err)
		}
		deadline := time.Now().Add(*timeout)
		if code, done := l.waitUntil(deadline, sigs, "etcd healthy", func() bool {
			resp, err := http.Get(etcdURL + "/health")
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp.StatusCode == 200 && bytes.Contains(b, []byte(`"true"`))
		}); done {
			return code
		}

		if _, err := l.start("kube-apiserver",
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			// A loopback advertise address is rejected by the lease endpoint
			// reconciler; the kubernetes Service gets no endpoints (unused here).
			"--endpoint-reconciler-type=none",
			fmt.Sprintf("--secure-port=%d", apiPort),
			"--etcd-servers="+etcdURL,
			"--client-ca-file="+p.CACert,
			"--tls-cert-file="+p.APIServerCert,
			"--tls-private-key-file="+p.APIServerKey,
			"--authorization-mode=Node,RBAC",
			"--enable-admission-plugins=NodeRestriction",
			// Without this the node starts with a not-ready taint that the
			// node lifecycle controller only removes seconds later.
			"--disable-admission-plugins=TaintNodesByCondition",
			"--service-account-issuer=https://kubernetes.default.svc",
			"--service-account-key-file="+p.SAPub,
			"--service-account-signing-key-file="+p.SAKey,
			"--service-cluster-ip-range=10.96.0.0/16",
			"--kubelet-client-certificate="+p.KubeletClientCert,
			"--kubelet-client-key="+p.KubeletClientKey,
			"--kubelet-certificate-authority="+p.CACert,
			"--kubelet-preferred-address-types=InternalIP",
			"--allow-privileged=true",
			"--profiling=false",
			"--audit-policy-file="+auditPolicyPath,
			"--audit-log-path="+auditLog,
			"--audit-log-mode=blocking",
			"--audit-log-maxsize=0",
			"--cert-dir="+filepath.Join(p.Dir, "apiserver-certs"),
			"--enable-priority-and-fairness=false",
		); err != nil {
			return fail("%v", err)
		}
		if _, err := l.start("node",
			"--kubeconfig="+nodeKubeconfig,
			"--node-name="+*nodeName,
			fmt.Sprintf("--port=%d", kubeletPort),
			"--tls-cert-file="+p.KubeletServingCert,
			"--tls-private-key-file="+p.KubeletServingKey,
			"--client-ca-file="+p.CACert,
			"--pods-dir="+filepath.Join(dir, "pods"),
		); err != nil {
			return fail("%v", err)
		}

		cfg, err := clientcmd.BuildConfigFromFlags("", adminKubeconfigTmp)
		if err != nil {
			return fail("%v", err)
		}
		cfg.Timeout = 5 * time.Second
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return fail("%v", err)
		}
		ctx := context.Background()
		if code, done := l.waitUntil(deadline, sigs, "kube-apiserver /readyz", func() bool {
			b, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
			return err == nil && strings.TrimSpace(string(b)) == "ok"
		}); done {
			return code
		}
		// The controller manager and scheduler fail hard when their
		// delegated-authn lookups are forbidden, i.e. before the RBAC
		// bootstrap policy exists, so start them once the apiserver is ready.
		if _, err := l.start("kube-controller-manager",
			"--kubeconfig="+kcmKubeconfig,
			"--authentication-kubeconfig="+kcmKubeconfig,
			"--authorization-kubeconfig="+kcmKubeconfig,
			"--service-account-private-key-file="+p.SAKey,
			"--root-ca-file="+p.CACert,
			"--use-service-account-credentials=true",
			"--cluster-signing-cert-file="+p.CACert,
			"--cluster-signing-key-file="+p.CAKey,
			"--bind-address=127.0.0.1",
			fmt.Sprintf("--secure-port=%d", kcmPort),
			"--cert-dir="+filepath.Join(p.Dir, "kcm-certs"),
			"--leader-elect=false",
			"--controllers=*",
			"--service-cluster-ip-range=10.96.0.0/16",
			"--profiling=false",
		); err != nil {
			return fail("%v", err)
		}
		if _, err := l.start("kube-scheduler",
			"--kubeconfig="+schedKubeconfig,
			"--authentication-kubeconfig="+schedKubeconfig,
			"--authorization-kubeconfig="+schedKubeconfig,
			"--leader-elect=false",
			"--bind-address=127.0.0.1",
			fmt.Sprintf("--secure-port=%d", schedPort),
			"--cert-dir="+filepath.Join(p.Dir, "scheduler-certs"),
			"--profiling=false",
		); err != nil {
			return fail("%v", err)
		}
		if code, done := l.waitUntil(deadline, sigs, "node "+*nodeName+" Ready", func() bool {
			n, err := cs.CoreV1().Nodes().Get(ctx, *nodeName, metav1.GetOptions{})
			if err != nil {
				return false
			}
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
					return true
				}
			}
			return false
		}); done {
			return code
		}
		// Pods can only be created once the default ServiceAccount exists.
		if code, done := l.waitUntil(deadline, sigs, "default ServiceAccount", func() bool {
			_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
			return err == nil
		}); done {
			return code
		}

		if err := writeKubeconfig(kubeconfig, server, p.CACert, p.AdminCert, p.AdminKey, "kubernetes-admin", true); err != nil {
			return fail("writing kubeconfig: %v", err)
		}
		info := map[string]any{
			"server":       server,
			"ca_file":      caFile,
			"kubeconfig":   kubeconfig,
			"node":         *nodeName,
			"audit_log":    auditLog,
			"logs_dir":     l.logDir,
			"kubelet_port": kubeletPort,
			"etcd":         etcdURL,
		}
		b, _ := json.MarshalIndent(info, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "cluster.json"), append(b, '\n'), 0o644); err != nil {
			return fail("%v", err)
		}
		fmt.Fprintf(os.Stderr, "devcluster run: ready after %.1fs\n", time.Since(t0).Seconds())
		w := bufio.NewWriter(os.Stdout)
		fmt.Fprintf(w, "ready %s\n", kubeconfig)
		w.Flush()
		os.Stdout.Sync()

		select {
		case s := <-sigs:
			fmt.Fprintf(os.Stderr, "devcluster run: got %v, stopping\n", s)
			return 0
		case c := <-l.died:
			fmt.Fprintln(os.Stderr, describeExit(c))
			return 1
		}
	}()

	l.stopAll(5 * time.Second)
	killProcsUnder(filepath.Join(dir, "pods"))
	return code
}

// waitUntil polls cond until it returns true. It returns done=true (with an
// exit code) when the deadline passes, a child dies or a signal arrives.
func (l *launcher) waitUntil(deadline time.Time, sigs chan os.Signal, what string, cond func() bool) (int, bool) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if cond() {
			return 0, false
		}
		select {
		case c := <-l.died:
			fmt.Fprintln(os.Stderr, describeExit(c))
			return 1, true
		case s := <-sigs:
			fmt.Fprintf(os.Stderr, "devcluster run: got %v while waiting for %s, stopping\n", s, what)
			return 1, true
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "devcluster run: timed out waiting for %s\n", what)
			l.mu.Lock()
			for _, c := range l.children {
				fmt.Fprintf(os.Stderr, "--- last lines of %s ---\n%s\n", c.logPath, tailFile(c.logPath, 15))
			}
			l.mu.Unlock()
			return 1, true
		}
	}
}
