package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/creack/pty"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

const (
	streamIdleTimeout     = 4 * time.Hour
	streamCreationTimeout = remotecommand.DefaultStreamCreationTimeout
)

// serveKubeletAPI starts the HTTPS kubelet API on 127.0.0.1:a.port.
func (a *nodeAgent) serveKubeletAPI(certFile, keyFile, caFile string, errCh chan<- error) (*http.Server, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no certificates in %s", caFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/exec/{ns}/{pod}/{container}", a.handleExec)
	mux.HandleFunc("/exec/{ns}/{pod}/{uid}/{container}", a.handleExec)
	mux.HandleFunc("/attach/{ns}/{pod}/{container}", a.handleAttach)
	mux.HandleFunc("/attach/{ns}/{pod}/{uid}/{container}", a.handleAttach)
	mux.HandleFunc("/portForward/{ns}/{pod}", a.handlePortForward)
	mux.HandleFunc("/portForward/{ns}/{pod}/{uid}", a.handlePortForward)
	mux.HandleFunc("/containerLogs/{ns}/{pod}/{container}", a.handleLogs)

	ln, err := net.Listen("tcp", net.JoinHostPort(nodeIP, strconv.Itoa(a.port)))
	if err != nil {
		return nil, err
	}
	srv := &http.Server{
		Handler: logRequests(mux),
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
			MinVersion:   tls.VersionTLS12,
			// The streaming protocols need HTTP/1.1 upgrades.
			NextProtos: []string{"http/1.1"},
		},
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          nil,
	}
	go func() {
		err := srv.ServeTLS(ln, "", "")
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			errCh <- err
		}
	}()
	logf("kubelet API listening on https://%s", ln.Addr())
	return srv, nil
}

func logRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user := ""
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			user = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		logf("kubelet API: %s %s (client %q)", r.Method, r.URL.RequestURI(), user)
		h.ServeHTTP(w, r)
	})
}

func (a *nodeAgent) podFor(w http.ResponseWriter, r *http.Request) *podRuntime {
	pr := a.lookup(r.PathValue("ns"), r.PathValue("pod"))
	if pr == nil {
		http.Error(w, "pod does not exist", http.StatusNotFound)
		return nil
	}
	if uid := r.PathValue("uid"); uid != "" && uid != string(pr.uid) {
		http.Error(w, "pod not found", http.StatusNotFound)
		return nil
	}
	return pr
}

// ---- exec / attach ----

type runtimeAdapter struct{ a *nodeAgent }

func (ra runtimeAdapter) pod(name string) (*podRuntime, error) {
	ns, n, _ := strings.Cut(name, "/")
	pr := ra.a.lookup(ns, n)
	if pr == nil {
		return nil, fmt.Errorf("pod %s not found", name)
	}
	return pr, nil
}

func (a *nodeAgent) handleExec(w http.ResponseWriter, r *http.Request) {
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pr := a.podFor(w, r)
	if pr == nil {
		return
	}
	c := pr.container(r.PathValue("container"))
	if c == nil {
		http.Error(w, fmt.Sprintf("container %q not found in pod", r.PathValue("container")), http.StatusNotFound)
		return
	}
	cmd := r.URL.Query()["command"]
	if len(cmd) == 0 {
		http.Error(w, "missing command", http.StatusBadRequest)
		return
	}
	remotecommand.ServeExec(w, r, runtimeAdapter{a}, pr.key, string(pr.uid), c.spec.Name, cmd, opts,
		streamIdleTimeout, streamCreationTimeout, remotecommand.SupportedStreamingProtocols)
}

func (a *nodeAgent) handleAttach(w http.ResponseWriter, r *http.Request) {
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pr := a.podFor(w, r)
	if pr == nil {
		return
	}
	c := pr.container(r.PathValue("container"))
	if c == nil {
		http.Error(w, fmt.Sprintf("container %q not found in pod", r.PathValue("container")), http.StatusNotFound)
		return
	}
	remotecommand.ServeAttach(w, r, runtimeAdapter{a}, pr.key, string(pr.uid), c.spec.Name, opts,
		streamIdleTimeout, streamCreationTimeout, remotecommand.SupportedStreamingProtocols)
}

func exitError(err error, ps *os.ProcessState) error {
	if ps == nil {
		return err
	}
	if st, ok := ps.Sys().(syscall.WaitStatus); ok {
		code := st.ExitStatus()
		if st.Signaled() {
			code = 128 + int(st.Signal())
		}
		if code == 0 {
			return nil
		}
		return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", code), Code: code}
	}
	return err
}

// ExecInContainer runs cmd as a local process in the pod's directory with the
// container's environment.
func (ra runtimeAdapter) ExecInContainer(ctx context.Context, name, uid, container string, cmd []string, in io.Reader, out, stderr io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, timeout time.Duration) error {
	pr, err := ra.pod(name)
	if err != nil {
		return err
	}
	c := pr.container(container)
	if c == nil {
		return fmt.Errorf("container %q not found", container)
	}
	pr.mu.Lock()
	env := append([]string(nil), c.env...)
	pathEnv := c.envMap["PATH"]
	pr.mu.Unlock()
	if env == nil {
		env = os.Environ()
		pathEnv = os.Getenv("PATH")
	}
	path, err := lookPathIn(cmd[0], pathEnv)
	if err != nil {
		// Same exit code a shell would give.
		if out != nil || stderr != nil {
			w := io.Writer(stderr)
			if w == nil || tty {
				w = out
			}
			fmt.Fprintf(w, "exec: %v\r\n", err)
		}
		return utilexec.CodeExitError{Err: err, Code: 127}
	}
	// An exec session sees the container's volumes: the same bind mounts
	// in a mount namespace of its own.
	mounts, err := pr.containerMounts(&c.spec)
	if err != nil {
		return err
	}
	path, argv, err := containerInitCommand(mounts, path, cmd)
	if err != nil {
		return err
	}
	wrapped := len(mounts) > 0
	proc := exec.Command(path, argv[1:]...)
	proc.Args[0] = argv[0]
	proc.Dir = pr.dir
	proc.Env = env
	if tty {
		return ra.execTTY(ctx, pr, proc, in, out, resize, wrapped)
	}
	proc.SysProcAttr = withMountNamespace(&syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}, wrapped)
	if out != nil {
		proc.Stdout = out
	}
	if stderr != nil {
		proc.Stderr = stderr
	}
	// Don't hang forever on grandchildren keeping stdout open.
	proc.WaitDelay = 2 * time.Second
	var stdinPipe io.WriteCloser
	if in != nil {
		stdinPipe, err = proc.StdinPipe()
		if err != nil {
			return err
		}
	}
	if err := proc.Start(); err != nil {
		return err
	}
	defer pr.trackExec(proc.Process.Pid)()
	if in != nil {
		go func() {
			_, _ = io.Copy(stdinPipe, in)
			stdinPipe.Close()
		}()
	}
	waitErr := make(chan error, 1)
	go func() { waitErr <- proc.Wait() }()
	select {
	case err = <-waitErr:
	case <-ctx.Done():
		_ = syscall.Kill(-proc.Process.Pid, syscall.SIGKILL)
		err = <-waitErr
	}
	return exitError(err, proc.ProcessState)
}

func (ra runtimeAdapter) execTTY(ctx context.Context, pr *podRuntime, proc *exec.Cmd, in io.Reader, out io.WriteCloser, resize <-chan remotecommand.TerminalSize, wrapped bool) error {
	proc.SysProcAttr = withMountNamespace(&syscall.SysProcAttr{Setsid: true, Setctty: true, Pdeathsig: syscall.SIGKILL}, wrapped)
	// Wait for the initial size when the client sends one promptly.
	var size *pty.Winsize
	if resize != nil {
		select {
		case s, ok := <-resize:
			if ok {
				size = &pty.Winsize{Rows: s.Height, Cols: s.Width}
			}
		case <-time.After(100 * time.Millisecond):
		}
	}
	ptmx, err := pty.StartWithAttrs(proc, size, proc.SysProcAttr)
	if err != nil {
		return err
	}
	defer ptmx.Close()
	defer pr.trackExec(proc.Process.Pid)()
	if resize != nil {
		go func() {
			for s := range resize {
				_ = pty.Setsize(ptmx, &pty.Winsize{Rows: s.Height, Cols: s.Width})
			}
		}()
	}
	if in != nil {
		go func() { _, _ = io.Copy(ptmx, in) }()
	}
	outDone := make(chan struct{})
	go func() {
		defer close(outDone)
		if out != nil {
			_, _ = io.Copy(out, ptmx)
		} else {
			_, _ = io.Copy(io.Discard, ptmx)
		}
	}()
	waitErr := make(chan error, 1)
	go func() { waitErr <- proc.Wait() }()
	select {
	case err = <-waitErr:
	case <-ctx.Done():
		_ = syscall.Kill(-proc.Process.Pid, syscall.SIGKILL)
		err = <-waitErr
	}
	// Drain the remaining output (ends with EIO once the slave side is gone).
	select {
	case <-outDone:
	case <-time.After(2 * time.Second):
	}
	return exitError(err, proc.ProcessState)
}

// AttachContainer streams the container's output (and feeds its stdin when
// the container was created with stdin: true).
func (ra runtimeAdapter) AttachContainer(ctx context.Context, name, uid, container string, in io.Reader, out, stderr io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	pr, err := ra.pod(name)
	if err != nil {
		return err
	}
	c := pr.container(container)
	if c == nil {
		return fmt.Errorf("container %q not found", container)
	}
	pr.mu.Lock()
	inst := c.cur
	pr.mu.Unlock()
	if !inst.running() {
		return fmt.Errorf("container %q is not running", container)
	}
	if in != nil && inst.stdin == nil {
		return fmt.Errorf("container %q was not created with stdin: true; attaching stdin is not supported", container)
	}
	sub := &attachSub{}
	if out != nil {
		sub.stdout = out
	}
	if stderr != nil {
		sub.stderr = stderr
	} else if tty {
		sub.stderr = sub.stdout
	}
	unsub := inst.subscribe(sub)
	defer unsub()
	if resize != nil {
		go func() {
			for range resize {
			}
		}()
	}
	stdinDone := make(chan struct{})
	if in != nil {
		go func() {
			defer close(stdinDone)
			_, _ = io.Copy(inst.stdin, in)
			if c.spec.StdinOnce {
				inst.stdin.Close()
			}
		}()
	}
	select {
	case <-inst.exited:
	case <-ctx.Done():
	case <-stdinDone:
		if !c.spec.StdinOnce {
			// Client detached.
			return nil
		}
		select {
		case <-inst.exited:
		case <-ctx.Done():
		}
	}
	// Let the remaining output drain.
	select {
	case <-inst.logsDone:
	case <-time.After(time.Second):
	}
	return nil
}

// ---- port forward ----

func (a *nodeAgent) handlePortForward(w http.ResponseWriter, r *http.Request) {
	opts, err := portforward.NewV4Options(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pr := a.podFor(w, r)
	if pr == nil {
		return
	}
	portforward.ServePortForward(w, r, runtimeAdapter{a}, pr.key, string(pr.uid), opts,
		streamIdleTimeout, streamCreationTimeout, portforward.SupportedProtocols)
}

// PortForward connects the stream to 127.0.0.1:port (the pod's "network
// namespace" is the host's loopback).
func (ra runtimeAdapter) PortForward(ctx context.Context, name, uid string, port int32, stream io.ReadWriteCloser) error {
	if _, err := ra.pod(name); err != nil {
		return err
	}
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(nodeIP, strconv.Itoa(int(port))), 10*time.Second)
	if err != nil {
		return fmt.Errorf("failed to connect to localhost:%d inside namespace %q: %v", port, name, err)
	}
	defer conn.Close()
	tcp := conn.(*net.TCPConn)
	go func() {
		// client -> pod; a clean EOF is passed on as a half-close.
		if _, err := io.Copy(tcp, stream); err != nil {
			tcp.Close()
		} else {
			_ = tcp.CloseWrite()
		}
	}()
	// pod -> client; returning closes the stream (the caller defers Close).
	_, _ = io.Copy(stream, tcp)
	return nil
}

// ---- logs ----

type logRecord struct {
	ts      time.Time
	rawTS   string
	stream  string
	partial bool
	content []byte
}

func parseLogRecords(data []byte) (recs []logRecord, consumed int) {
	for {
		i := bytes.IndexByte(data[consumed:], '\n')
		if i < 0 {
			return
		}
		line := data[consumed : consumed+i]
		consumed += i + 1
		parts := bytes.SplitN(line, []byte(" "), 4)
		if len(parts) < 4 {
			continue
		}
		ts, _ := time.Parse(time.RFC3339Nano, string(parts[0]))
		recs = append(recs, logRecord{ts: ts, rawTS: string(parts[0]), stream: string(parts[1]), partial: string(parts[2]) == "P", content: parts[3]})
	}
}

type limitedWriter struct {
	w     io.Writer
	left  int64
	limit bool
}

var errLimitReached = errors.New("limit reached")

func (l *limitedWriter) Write(p []byte) (int, error) {
	if !l.limit {
		return l.w.Write(p)
	}
	if l.left <= 0 {
		return 0, errLimitReached
	}
	if int64(len(p)) > l.left {
		n, err := l.w.Write(p[:l.left])
		l.left -= int64(n)
		if err == nil {
			err = errLimitReached
		}
		return n, err
	}
	n, err := l.w.Write(p)
	l.left -= int64(n)
	return n, err
}

func (a *nodeAgent) handleLogs(w http.ResponseWriter, r *http.Request) {
	pr := a.podFor(w, r)
	if pr == nil {
		return
	}
	q := r.URL.Query()
	c := pr.containerOrDefault(r.PathValue("container"))
	if c == nil {
		http.Error(w, fmt.Sprintf("container %q not found in pod %s", r.PathValue("container"), pr.key), http.StatusNotFound)
		return
	}
	follow := q.Get("follow") == "true" || q.Get("follow") == "1"
	timestamps := q.Get("timestamps") == "true" || q.Get("timestamps") == "1"
	previous := q.Get("previous") == "true" || q.Get("previous") == "1"
	tail := -1
	if s := q.Get("tailLines"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			http.Error(w, "invalid tailLines", http.StatusBadRequest)
			return
		}
		tail = n
	}
	var since time.Time
	if s := q.Get("sinceSeconds"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			http.Error(w, "invalid sinceSeconds", http.StatusBadRequest)
			return
		}
		since = time.Now().Add(-time.Duration(n) * time.Second)
	}
	if s := q.Get("sinceTime"); s != "" {
		t, err := time.Parse(time.RFC3339, s)
		if err != nil {
			http.Error(w, "invalid sinceTime", http.StatusBadRequest)
			return
		}
		since = t
	}
	lw := &limitedWriter{w: w}
	if s := q.Get("limitBytes"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 {
			http.Error(w, "invalid limitBytes", http.StatusBadRequest)
			return
		}
		lw.limit, lw.left = true, n
	}

	pr.mu.Lock()
	inst := c.cur
	if previous {
		inst = c.prev
		if c.cur != nil && !c.cur.running() && c.waiting == "CrashLoopBackOff" {
			inst = c.cur
		}
	}
	pr.mu.Unlock()
	if inst == nil || inst.logPath == "" {
		if previous {
			http.Error(w, fmt.Sprintf("previous terminated container %q in pod %q not found", c.spec.Name, pr.name), http.StatusBadRequest)
		} else {
			http.Error(w, fmt.Sprintf("container %q in pod %q is waiting to start", c.spec.Name, pr.name), http.StatusBadRequest)
		}
		return
	}
	f, err := os.Open(inst.logPath)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	flush := func() {
		if flusher != nil {
			flusher.Flush()
		}
	}
	bw := bufio.NewWriter(lw)
	atLineStart := true
	emit := func(recs []logRecord) error {
		for _, rec := range recs {
			if !since.IsZero() && rec.ts.Before(since) {
				atLineStart = !rec.partial
				continue
			}
			if timestamps && atLineStart {
				bw.WriteString(rec.rawTS)
				bw.WriteByte(' ')
			}
			bw.Write(rec.content)
			if !rec.partial {
				bw.WriteByte('\n')
			}
			atLineStart = !rec.partial
		}
		return bw.Flush()
	}

	// Initial content.
	data, err := io.ReadAll(f)
	if err != nil {
		return
	}
	recs, consumed := parseLogRecords(data)
	pending := data[consumed:]
	if tail >= 0 {
		// Count logical lines from the end.
		lines := 0
		start := len(recs)
		for i := len(recs) - 1; i >= 0; i-- {
			if !recs[i].partial {
				if lines == tail {
					break
				}
				lines++
			}
			start = i
		}
		if tail == 0 {
			start = len(recs)
		}
		recs = recs[start:]
	}
	if err := emit(recs); err != nil {
		return
	}
	flush()
	if !follow {
		return
	}
	buf := make([]byte, 64*1024)
	for {
		notify := inst.notifyCh()
		doneBefore := false
		select {
		case <-inst.logsDone:
			doneBefore = true
		default:
		}
		// Read whatever was appended.
		for {
			n, err := f.Read(buf)
			if n > 0 {
				pending = append(pending, buf[:n]...)
				recs, consumed := parseLogRecords(pending)
				pending = append([]byte(nil), pending[consumed:]...)
				if err := emit(recs); err != nil {
					return
				}
				flush()
			}
			if err != nil || n == 0 {
				break
			}
		}
		if doneBefore {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-notify:
		case <-time.After(500 * time.Millisecond):
		}
	}
}
