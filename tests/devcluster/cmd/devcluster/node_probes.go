package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Probes follow the kubelet's prober: a startup probe first (liveness and
// readiness wait for it), then readiness and liveness each every
// periodSeconds after initialDelaySeconds, with timeoutSeconds, and
// failureThreshold/successThreshold consecutive results before a change.
// A container with a readiness probe is unready until it passes; a failed
// liveness or startup probe kills the container, which then restarts as its
// restartPolicy says.

// probeDefaults fills in the API defaults (the apiserver sets them on pods,
// but a probe built in a unit test may lack them).
func probeDefaults(p *corev1.Probe) (delay, period, timeout time.Duration, success, failure int32) {
	period, timeout, success, failure = 10*time.Second, time.Second, 1, 3
	if p.PeriodSeconds > 0 {
		period = time.Duration(p.PeriodSeconds) * time.Second
	}
	if p.TimeoutSeconds > 0 {
		timeout = time.Duration(p.TimeoutSeconds) * time.Second
	}
	if p.SuccessThreshold > 0 {
		success = p.SuccessThreshold
	}
	if p.FailureThreshold > 0 {
		failure = p.FailureThreshold
	}
	return time.Duration(p.InitialDelaySeconds) * time.Second, period, timeout, success, failure
}

// probeThresholds turns single results into a state that changes only
// after enough consecutive results of the other kind.
type probeThresholds struct {
	success, failure int32
	okRun, failRun   int32
}

// observe records one result; changed reports a new state, ok what it is.
func (t *probeThresholds) observe(result bool, state bool) (ok, changed bool) {
	if result {
		t.okRun, t.failRun = t.okRun+1, 0
		if !state && t.okRun >= t.success {
			return true, true
		}
	} else {
		t.failRun, t.okRun = t.failRun+1, 0
		if state && t.failRun >= t.failure {
			return false, true
		}
	}
	return state, false
}

// resolvePort finds a probe's port, which may name a container port.
func resolvePort(port intstr.IntOrString, c *corev1.Container) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(port.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("no container port named %q", port.StrVal)
}

// runProbe runs one probe; nil means success.
func (pr *podRuntime) runProbe(c *containerRuntime, p *corev1.Probe, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(pr.a.ctx, timeout)
	defer cancel()
	switch {
	case p.Exec != nil:
		return pr.execProbe(ctx, c, p.Exec.Command)
	case p.HTTPGet != nil:
		return httpProbe(ctx, &c.spec, p.HTTPGet)
	case p.GRPC != nil:
		return grpcProbe(ctx, p.GRPC)
	case p.TCPSocket != nil:
		port, err := resolvePort(p.TCPSocket.Port, &c.spec)
		if err != nil {
			return err
		}
		host := p.TCPSocket.Host
		if host == "" {
			host = nodeIP
		}
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	}
	return fmt.Errorf("probe has no handler")
}

// execProbe runs the command as an exec session would: the container's
// environment and mounts; success is exit code 0.
func (pr *podRuntime) execProbe(ctx context.Context, c *containerRuntime, command []string) error {
	if len(command) == 0 {
		return fmt.Errorf("exec probe without a command")
	}
	pr.mu.Lock()
	env := append([]string(nil), c.env...)
	pathEnv := c.envMap["PATH"]
	pr.mu.Unlock()
	path, err := lookPathIn(command[0], pathEnv)
	if err != nil {
		return err
	}
	mounts, err := pr.containerMounts(&c.spec)
	if err != nil {
		return err
	}
	path, argv, err := containerInitCommand(mounts, path, command)
	if err != nil {
		return err
	}
	cmd := exec.Command(path, argv[1:]...)
	cmd.Args[0] = argv[0]
	cmd.Dir = pr.dir
	cmd.Env = env
	cmd.SysProcAttr = withMountNamespace(&syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}, len(mounts) > 0)
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return err
	}
	defer pr.trackExec(cmd.Process.Pid)()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
		return err
	case <-ctx.Done():
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("exec probe timed out")
	}
}

func httpProbe(ctx context.Context, c *corev1.Container, h *corev1.HTTPGetAction) error {
	port, err := resolvePort(h.Port, c)
	if err != nil {
		return err
	}
	host := h.Host
	if host == "" {
		host = nodeIP
	}
	scheme := "http"
	if h.Scheme == corev1.URISchemeHTTPS {
		scheme = "https"
	}
	path := h.Path
	if path == "" || path[0] != '/' {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, strconv.Itoa(port))+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "kube-probe/1.37")
	for _, hd := range h.HTTPHeaders {
		req.Header.Add(hd.Name, hd.Value)
	}
	// Like the kubelet: HTTPS probes do not verify the certificate, redirects are followed.
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("HTTP probe failed with status %d", resp.StatusCode)
	}
	return nil
}

func grpcProbe(ctx context.Context, g *corev1.GRPCAction) error {
	conn, err := grpc.NewClient(net.JoinHostPort(nodeIP, strconv.Itoa(int(g.Port))),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	service := ""
	if g.Service != nil {
		service = *g.Service
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("gRPC health status %s", resp.Status)
	}
	return nil
}

// watchProbe runs probe p every period while inst runs and calls report
// when its state changes (the state starts as initial). It returns when
// the instance exits or report returns false.
func (pr *podRuntime) watchProbe(c *containerRuntime, inst *containerInstance, p *corev1.Probe, initial bool, report func(ok bool) bool) {
	delay, period, timeout, success, failure := probeDefaults(p)
	th := probeThresholds{success: success, failure: failure}
	state := initial
	wait := delay
	for {
		select {
		case <-inst.exited:
			return
		case <-time.After(wait):
		}
		wait = period
		err := pr.runProbe(c, p, timeout)
		ok, changed := th.observe(err == nil, state)
		if !changed {
			continue
		}
		state = ok
		if err != nil {
			logf("pod %s: container %s: probe failed: %v", pr.key, c.spec.Name, err)
		}
		if !report(ok) {
			return
		}
	}
}

// awaitStartup runs the startup probe until it passes (true) or fails
// failureThreshold times in a row, which kills the container.
func (pr *podRuntime) awaitStartup(c *containerRuntime, inst *containerInstance, p *corev1.Probe) bool {
	delay, period, timeout, _, failure := probeDefaults(p)
	failures := int32(0)
	wait := delay
	for {
		select {
		case <-inst.exited:
			return false
		case <-time.After(wait):
		}
		wait = period
		err := pr.runProbe(c, p, timeout)
		if err == nil {
			return true
		}
		if failures++; failures >= failure {
			logf("pod %s: container %s: startup probe failed: %v", pr.key, c.spec.Name, err)
			pr.killForProbe(c, inst, "startup")
			return false
		}
	}
}

// killForProbe kills a container whose liveness or startup probe failed.
func (pr *podRuntime) killForProbe(c *containerRuntime, inst *containerInstance, kind string) {
	logf("pod %s: container %s failed its %s probe, killing it", pr.key, c.spec.Name, kind)
	_ = syscall.Kill(-inst.pgid, syscall.SIGKILL)
}

func (pr *podRuntime) setProbeState(inst *containerInstance, started, ready *bool) {
	pr.mu.Lock()
	if started != nil {
		inst.started = *started
	}
	if ready != nil {
		inst.ready = *ready
	}
	pr.mu.Unlock()
	pr.markDirty()
}

// probe runs the probes of one container instance until it exits.
func (pr *podRuntime) probe(c *containerRuntime, inst *containerInstance) {
	yes := true
	if sp := c.spec.StartupProbe; sp != nil && !pr.awaitStartup(c, inst, sp) {
		return
	}
	pr.setProbeState(inst, &yes, nil)
	if lp := c.spec.LivenessProbe; lp != nil {
		go pr.watchProbe(c, inst, lp, true, func(ok bool) bool {
			if !ok {
				pr.killForProbe(c, inst, "liveness")
			}
			return ok
		})
	}
	if rp := c.spec.ReadinessProbe; rp != nil {
		pr.watchProbe(c, inst, rp, false, func(ok bool) bool { pr.setProbeState(inst, nil, &ok); return true })
		return
	}
	pr.setProbeState(inst, nil, &yes)
}
