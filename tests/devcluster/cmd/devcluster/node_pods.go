package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
	"k8s.io/utils/ptr"
)

// containerInstance is one run (one process) of a container.
type containerInstance struct {
	restart   int32
	logPath   string
	cmd       *exec.Cmd
	pgid      int
	startedAt time.Time
	stdin     io.WriteCloser // non-nil when spec.stdin is set

	exited   chan struct{} // closed once the process has exited
	logsDone chan struct{} // closed once stdout/stderr have been fully copied
	exitCode int32
	reason   string
	finished time.Time
	started  bool // the startup probe passed (or there is none)
	ready    bool // the readiness probe passes (or there is none)

	logMu   sync.Mutex
	logFile *os.File
	notify  chan struct{} // closed (and replaced) whenever the log grows
	subs    map[int]*attachSub
	nextSub int
}

type attachSub struct {
	stdout, stderr io.Writer
}

type containerRuntime struct {
	spec         corev1.Container
	init         bool
	env          []string
	envMap       map[string]string
	cur, prev    *containerInstance
	restartCount int32
	waiting      string // waiting reason while not running
	startErr     string
	configErr    string // why the environment cannot be built; the container waits
}

type podRuntime struct {
	a         *nodeAgent
	uid       types.UID
	ns, name  string
	key       string
	dir       string
	startTime metav1.Time

	mu          sync.Mutex
	pod         *corev1.Pod
	inits       []*containerRuntime
	containers  []*containerRuntime
	initialized bool
	phase       corev1.PodPhase
	stopping    bool
	execs       map[int]bool // process groups of running exec sessions
	volumeErr   string       // why the volumes cannot be prepared yet; containers wait

	stopCh        chan struct{} // closed when the pod starts terminating
	finished      chan struct{} // closed when all container loops have returned
	gone          chan struct{} // closed when the pod is forgotten
	dirty         chan struct{}
	terminateOnce sync.Once
}

func newPodRuntime(a *nodeAgent, p *corev1.Pod) *podRuntime {
	pr := &podRuntime{
		a: a, uid: p.UID, ns: p.Namespace, name: p.Name, key: p.Namespace + "/" + p.Name,
		dir:       filepath.Join(a.podsDir, fmt.Sprintf("%s_%s_%s", p.Namespace, p.Name, p.UID)),
		startTime: metav1.Now(),
		pod:       p.DeepCopy(),
		phase:     corev1.PodPending,
		stopCh:    make(chan struct{}),
		finished:  make(chan struct{}),
		gone:      make(chan struct{}),
		dirty:     make(chan struct{}, 1),
		execs:     map[int]bool{},
	}
	for _, c := range p.Spec.InitContainers {
		pr.inits = append(pr.inits, &containerRuntime{spec: c, init: true, waiting: "PodInitializing"})
	}
	for _, c := range p.Spec.Containers {
		pr.containers = append(pr.containers, &containerRuntime{spec: c, waiting: "ContainerCreating"})
	}
	return pr
}

func (pr *podRuntime) setPod(p *corev1.Pod) {
	pr.mu.Lock()
	pr.pod = p.DeepCopy()
	pr.mu.Unlock()
}

func (pr *podRuntime) markDirty() {
	select {
	case pr.dirty <- struct{}{}:
	default:
	}
}

func (pr *podRuntime) isStopping() bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.stopping
}

func (pr *podRuntime) container(name string) *containerRuntime {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	for _, c := range pr.containers {
		if c.spec.Name == name {
			return c
		}
	}
	for _, c := range pr.inits {
		if c.spec.Name == name {
			return c
		}
	}
	return nil
}

// defaultContainer returns the only container name when name is empty.
func (pr *podRuntime) containerOrDefault(name string) *containerRuntime {
	if name == "" {
		pr.mu.Lock()
		defer pr.mu.Unlock()
		if len(pr.containers) > 0 {
			return pr.containers[0]
		}
		return nil
	}
	return pr.container(name)
}

func (pr *podRuntime) run() {
	logf("pod %s: starting (uid %s)", pr.key, pr.uid)
	go pr.statusLoop()
	defer func() {
		close(pr.finished)
		pr.markDirty()
	}()
	if err := os.MkdirAll(filepath.Join(pr.dir, "logs"), 0o755); err != nil {
		logf("pod %s: %v", pr.key, err)
	}
	pr.markDirty()
	if !pr.awaitVolumes() {
		return
	}

	restartPolicy := pr.pod.Spec.RestartPolicy
	for _, c := range pr.inits {
		for {
			if pr.isStopping() || !pr.awaitEnv(c) {
				return
			}
			code := pr.runOnce(c)
			if code == 0 {
				break
			}
			if restartPolicy == corev1.RestartPolicyNever {
				pr.mu.Lock()
				pr.phase = corev1.PodFailed
				pr.mu.Unlock()
				return
			}
			if !pr.backoff(c, time.Second) {
				return
			}
		}
	}
	pr.mu.Lock()
	pr.initialized = true
	pr.mu.Unlock()
	pr.markDirty()

	var wg sync.WaitGroup
	for _, c := range pr.containers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pr.containerLoop(c, restartPolicy)
		}()
	}
	wg.Wait()

	pr.mu.Lock()
	if !pr.stopping || pr.phase == corev1.PodRunning || pr.phase == corev1.PodPending {
		failed := false
		for _, c := range pr.containers {
			if c.cur == nil || c.cur.exitCode != 0 {
				failed = true
			}
		}
		if failed {
			pr.phase = corev1.PodFailed
		} else {
			pr.phase = corev1.PodSucceeded
		}
	}
	pr.mu.Unlock()
	logf("pod %s: all containers finished, phase %s", pr.key, pr.phase)
}

// backoff waits before a restart; false means the pod is stopping.
func (pr *podRuntime) backoff(c *containerRuntime, d time.Duration) bool {
	pr.mu.Lock()
	c.waiting = "CrashLoopBackOff"
	pr.mu.Unlock()
	pr.markDirty()
	select {
	case <-pr.stopCh:
		return false
	case <-time.After(d):
	}
	pr.mu.Lock()
	c.restartCount++
	pr.mu.Unlock()
	return true
}

func (pr *podRuntime) containerLoop(c *containerRuntime, policy corev1.RestartPolicy) {
	backoff := time.Second
	for {
		if pr.isStopping() || !pr.awaitEnv(c) {
			return
		}
		started := time.Now()
		code := pr.runOnce(c)
		restart := policy == corev1.RestartPolicyAlways || policy == "" || (policy == corev1.RestartPolicyOnFailure && code != 0)
		if !restart || pr.isStopping() {
			return
		}
		if time.Since(started) > 10*time.Second {
			backoff = time.Second
		}
		if !pr.backoff(c, backoff) {
			return
		}
		backoff *= 2
		if backoff > 10*time.Second {
			backoff = 10 * time.Second
		}
	}
}

// runOnce starts one instance of the container and waits for it to exit.
func (pr *podRuntime) runOnce(c *containerRuntime) int32 {
	inst, err := pr.startInstance(c)
	if err != nil {
		logf("pod %s: container %s failed to start: %v", pr.key, c.spec.Name, err)
		pr.mu.Lock()
		now := time.Now()
		if inst == nil {
			inst = &containerInstance{restart: c.restartCount, startedAt: now, exited: make(chan struct{}), logsDone: make(chan struct{}), notify: make(chan struct{})}
			close(inst.exited)
			close(inst.logsDone)
		}
		inst.exitCode = 128
		inst.reason = "StartError"
		inst.finished = now
		if c.cur != nil {
			c.prev = c.cur
		}
		c.cur = inst
		c.startErr = err.Error()
		pr.mu.Unlock()
		pr.markDirty()
		return 128
	}
	pr.markDirty()
	<-inst.exited
	logf("pod %s: container %s exited with %d", pr.key, c.spec.Name, inst.exitCode)
	pr.markDirty()
	return inst.exitCode
}

func lookPathIn(file, pathEnv string) (string, error) {
	if strings.Contains(file, "/") {
		return file, nil
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable file %q not found in $PATH", file)
}

func (pr *podRuntime) argv(c *containerRuntime) []string {
	mapping := expansion.MappingFuncFor(c.envMap)
	var argv []string
	for _, s := range c.spec.Command {
		argv = append(argv, expansion.Expand(s, mapping))
	}
	for _, s := range c.spec.Args {
		argv = append(argv, expansion.Expand(s, mapping))
	}
	if len(argv) == 0 {
		// No image entrypoint to fall back to: keep the container alive.
		argv = []string{"sleep", "infinity"}
	}
	return argv
}

func (pr *podRuntime) startInstance(c *containerRuntime) (*containerInstance, error) {
	argv := pr.argv(c)
	path, err := lookPathIn(argv[0], c.envMap["PATH"])
	if err != nil {
		return nil, err
	}
	if err := pr.writeHosts(); err != nil {
		return nil, err
	}
	mounts, err := pr.containerMounts(&c.spec)
	if err != nil {
		return nil, err
	}
	path, wrappedArgv, err := containerInitCommand(mounts, path, argv)
	if err != nil {
		return nil, err
	}
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.stopping {
		return nil, fmt.Errorf("pod is terminating")
	}
	restart := c.restartCount
	logDir := filepath.Join(pr.dir, "logs", c.spec.Name)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	logPath := filepath.Join(logDir, fmt.Sprintf("%d.log", restart))
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		lf.Close()
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		lf.Close()
		outR.Close()
		outW.Close()
		return nil, err
	}
	cmd := exec.Command(path, wrappedArgv[1:]...)
	cmd.Args[0] = wrappedArgv[0]
	cmd.Dir = pr.dir
	cmd.Env = c.env
	cmd.Stdout = outW
	cmd.Stderr = errW
	cmd.SysProcAttr = withMountNamespace(&syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}, len(mounts) > 0)
	var stdinW io.WriteCloser
	var stdinR *os.File
	if c.spec.Stdin {
		stdinR, stdinW, err = os.Pipe()
		if err != nil {
			lf.Close()
			return nil, err
		}
		cmd.Stdin = stdinR
	}
	inst := &containerInstance{
		restart: restart, logPath: logPath, cmd: cmd, stdin: stdinW,
		exited: make(chan struct{}), logsDone: make(chan struct{}), notify: make(chan struct{}),
		logFile: lf, subs: map[int]*attachSub{},
	}
	startErr := cmd.Start()
	outW.Close()
	errW.Close()
	if stdinR != nil {
		stdinR.Close()
	}
	if startErr != nil {
		outR.Close()
		errR.Close()
		lf.Close()
		if stdinW != nil {
			stdinW.Close()
		}
		return nil, startErr
	}
	inst.pgid = cmd.Process.Pid
	inst.startedAt = time.Now()
	// Without probes a running container is started and ready at once, as before.
	inst.started = c.spec.StartupProbe == nil
	inst.ready = inst.started && c.spec.ReadinessProbe == nil
	if c.cur != nil {
		c.prev = c.cur
	}
	c.cur = inst
	c.waiting = ""
	c.startErr = ""

	var copiers sync.WaitGroup
	copiers.Add(2)
	go func() { defer copiers.Done(); inst.copyLog(outR, "stdout") }()
	go func() { defer copiers.Done(); inst.copyLog(errR, "stderr") }()
	go func() {
		copiers.Wait()
		inst.logMu.Lock()
		inst.logFile.Close()
		inst.logMu.Unlock()
		close(inst.logsDone)
		inst.wake()
	}()
	go func() {
		werr := cmd.Wait()
		code := int32(0)
		if st, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
			switch {
			case st.Signaled():
				code = 128 + int32(st.Signal())
			default:
				code = int32(st.ExitStatus())
			}
		} else if werr != nil {
			code = 1
		}
		pr.mu.Lock()
		inst.exitCode = code
		inst.finished = time.Now()
		if code == 0 {
			inst.reason = "Completed"
		} else {
			inst.reason = "Error"
		}
		if inst.stdin != nil {
			inst.stdin.Close()
		}
		pr.mu.Unlock()
		close(inst.exited)
		inst.wake()
	}()
	go pr.probe(c, inst)
	logf("pod %s: started container %s (pid %d, restart %d): %q", pr.key, c.spec.Name, inst.pgid, restart, argv)
	return inst, nil
}

func (inst *containerInstance) wake() {
	inst.logMu.Lock()
	close(inst.notify)
	inst.notify = make(chan struct{})
	inst.logMu.Unlock()
}

func (inst *containerInstance) notifyCh() <-chan struct{} {
	inst.logMu.Lock()
	defer inst.logMu.Unlock()
	return inst.notify
}

func (inst *containerInstance) copyLog(r *os.File, stream string) {
	defer r.Close()
	buf := make([]byte, 32*1024)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			inst.writeLog(stream, buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// writeLog appends data in the CRI log format ("TS STREAM F|P CONTENT\n").
func (inst *containerInstance) writeLog(stream string, data []byte) {
	ts := time.Now().UTC().Format(time.RFC3339Nano)
	var b bytes.Buffer
	rest := data
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			b.WriteString(ts + " " + stream + " P ")
			b.Write(rest)
			b.WriteByte('\n')
			break
		}
		b.WriteString(ts + " " + stream + " F ")
		b.Write(rest[:i])
		b.WriteByte('\n')
		rest = rest[i+1:]
	}
	inst.logMu.Lock()
	_, _ = inst.logFile.Write(b.Bytes())
	for _, s := range inst.subs {
		w := s.stdout
		if stream == "stderr" {
			w = s.stderr
		}
		if w != nil {
			_, _ = w.Write(data)
		}
	}
	close(inst.notify)
	inst.notify = make(chan struct{})
	inst.logMu.Unlock()
}

func (inst *containerInstance) subscribe(s *attachSub) func() {
	inst.logMu.Lock()
	defer inst.logMu.Unlock()
	id := inst.nextSub
	inst.nextSub++
	inst.subs[id] = s
	return func() {
		inst.logMu.Lock()
		delete(inst.subs, id)
		inst.logMu.Unlock()
	}
}

func (inst *containerInstance) running() bool {
	if inst == nil || inst.cmd == nil {
		return false
	}
	select {
	case <-inst.exited:
		return false
	default:
		return true
	}
}

// signalAll sends sig to the process group of every running container.
func (pr *podRuntime) signalAll(sig syscall.Signal) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	for _, c := range append(append([]*containerRuntime{}, pr.inits...), pr.containers...) {
		if c.cur.running() {
			_ = syscall.Kill(-c.cur.pgid, sig)
		}
	}
	for pgid := range pr.execs {
		_ = syscall.Kill(-pgid, sig)
	}
}

// trackExec registers an exec session's process group so that it is killed
// with the pod; the returned func unregisters it.
func (pr *podRuntime) trackExec(pgid int) func() {
	pr.mu.Lock()
	if pr.stopping {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	}
	pr.execs[pgid] = true
	pr.mu.Unlock()
	return func() {
		pr.mu.Lock()
		delete(pr.execs, pgid)
		pr.mu.Unlock()
	}
}

// terminate stops the pod: SIGTERM, SIGKILL after grace; then (if
// deleteAfter) deletes the pod object with grace period 0, like a kubelet.
func (pr *podRuntime) terminate(grace time.Duration, deleteAfter bool) {
	pr.terminateOnce.Do(func() {
		pr.mu.Lock()
		pr.stopping = true
		pr.mu.Unlock()
		close(pr.stopCh)
		logf("pod %s: terminating (grace %s)", pr.key, grace)
		go func() {
			pr.signalAll(syscall.SIGTERM)
			select {
			case <-pr.finished:
			case <-time.After(grace):
				pr.signalAll(syscall.SIGKILL)
				<-pr.finished
			}
			if deleteAfter {
				pr.markDirty()
				// Give the status loop a moment to report the final state.
				pr.pushStatus()
				pr.a.finalDelete(pr.ns, pr.name, pr.uid)
			}
			pr.a.forget(pr)
			close(pr.gone)
			_ = os.RemoveAll(pr.dir)
			logf("pod %s: terminated", pr.key)
		}()
	})
}

// killNow SIGKILLs everything (node shutdown) and waits briefly.
func (pr *podRuntime) killNow() {
	pr.mu.Lock()
	pr.stopping = true
	pr.mu.Unlock()
	pr.terminateOnce.Do(func() { close(pr.stopCh) })
	pr.signalAll(syscall.SIGKILL)
	select {
	case <-pr.finished:
	case <-time.After(2 * time.Second):
	}
}

func (pr *podRuntime) statusLoop() {
	var retry <-chan time.Time
	for {
		select {
		case <-pr.gone:
			return
		case <-pr.a.ctx.Done():
			return
		case <-pr.dirty:
		case <-retry:
		}
		retry = nil
		ok, exists := pr.pushStatusResult()
		if !exists {
			return
		}
		if !ok {
			retry = time.After(time.Second)
		}
	}
}

// pushStatus writes the current status; false if the pod no longer exists.
func (pr *podRuntime) pushStatus() bool {
	_, exists := pr.pushStatusResult()
	return exists
}

// pushStatusResult writes the current status. ok reports success, exists
// whether the pod (with our UID) still exists.
func (pr *podRuntime) pushStatusResult() (ok, exists bool) {
	ctx, cancel := context.WithTimeout(pr.a.ctx, 10*time.Second)
	defer cancel()
	pods := pr.a.cs.CoreV1().Pods(pr.ns)
	for i := 0; i < 10; i++ {
		p, err := pods.Get(ctx, pr.name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, false
		}
		if err != nil {
			logf("pod %s: get for status: %v", pr.key, err)
			return false, true
		}
		if p.UID != pr.uid {
			return false, false
		}
		p.Status = pr.buildStatus(p.Status)
		_, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{})
		if err == nil {
			return true, true
		}
		if apierrors.IsNotFound(err) {
			return false, false
		}
		if !apierrors.IsConflict(err) {
			logf("pod %s: update status: %v", pr.key, err)
			return false, true
		}
	}
	return false, true
}

func setPodCondition(st *corev1.PodStatus, t corev1.PodConditionType, ok bool, reason string) {
	s := corev1.ConditionFalse
	if ok {
		s = corev1.ConditionTrue
		reason = ""
	}
	for i := range st.Conditions {
		if st.Conditions[i].Type == t {
			if st.Conditions[i].Status != s {
				st.Conditions[i].LastTransitionTime = metav1.Now()
			}
			st.Conditions[i].Status = s
			st.Conditions[i].Reason = reason
			return
		}
	}
	st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: s, Reason: reason, LastTransitionTime: metav1.Now()})
}

func (pr *podRuntime) containerID(c *containerRuntime, inst *containerInstance) string {
	return fmt.Sprintf("devcluster://%s-%s-%d", pr.uid, c.spec.Name, inst.restart)
}

func (pr *podRuntime) containerStatus(c *containerRuntime) corev1.ContainerStatus {
	cs := corev1.ContainerStatus{
		Name:         c.spec.Name,
		Image:        c.spec.Image,
		ImageID:      "devcluster://" + c.spec.Image,
		RestartCount: c.restartCount,
		Started:      ptr.To(false),
	}
	term := func(inst *containerInstance) *corev1.ContainerStateTerminated {
		t := &corev1.ContainerStateTerminated{
			ExitCode:   inst.exitCode,
			Reason:     inst.reason,
			StartedAt:  metav1.NewTime(inst.startedAt),
			FinishedAt: metav1.NewTime(inst.finished),
		}
		if inst.cmd != nil {
			t.ContainerID = pr.containerID(c, inst)
		} else {
			t.Message = c.startErr
		}
		return t
	}
	switch {
	case c.cur.running():
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(c.cur.startedAt)}
		cs.Ready = c.cur.ready
		cs.Started = ptr.To(c.cur.started)
		cs.ContainerID = pr.containerID(c, c.cur)
		if c.prev != nil {
			cs.LastTerminationState.Terminated = term(c.prev)
		}
	case c.configErr != "":
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "CreateContainerConfigError", Message: c.configErr}
		if c.cur != nil {
			cs.LastTerminationState.Terminated = term(c.cur)
		}
	case c.cur != nil && c.waiting == "CrashLoopBackOff":
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff",
			Message: fmt.Sprintf("back-off restarting failed container %s", c.spec.Name)}
		cs.LastTerminationState.Terminated = term(c.cur)
	case c.cur != nil:
		cs.State.Terminated = term(c.cur)
		if c.cur.cmd != nil {
			cs.ContainerID = pr.containerID(c, c.cur)
		}
		if c.prev != nil {
			cs.LastTerminationState.Terminated = term(c.prev)
		}
	default:
		msg := c.startErr
		if msg == "" {
			msg = pr.volumeErr
		}
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waiting, Message: msg}
	}
	return cs
}

func (pr *podRuntime) buildStatus(old corev1.PodStatus) corev1.PodStatus {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	st := *old.DeepCopy()
	st.HostIP = nodeIP
	st.HostIPs = []corev1.HostIP{{IP: nodeIP}}
	st.PodIP = nodeIP
	st.PodIPs = []corev1.PodIP{{IP: nodeIP}}
	st.StartTime = &pr.startTime

	st.InitContainerStatuses = nil
	for _, c := range pr.inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, pr.containerStatus(c))
	}
	st.ContainerStatuses = nil
	allRunning := len(pr.containers) > 0
	allReady := true
	anyRunning := false
	for _, c := range pr.containers {
		cs := pr.containerStatus(c)
		if cs.State.Running == nil {
			allRunning = false
		} else {
			anyRunning = true
		}
		allReady = allReady && cs.Ready
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
	}
	phase := pr.phase
	select {
	case <-pr.finished:
	default:
		if anyRunning || pr.initialized && phase == corev1.PodPending {
			if anyRunning {
				phase = corev1.PodRunning
			}
		}
	}
	if phase == corev1.PodRunning || phase == corev1.PodPending {
		pr.phase = phase
	}
	st.Phase = phase
	ready := allRunning && allReady && !pr.stopping && phase == corev1.PodRunning
	setPodCondition(&st, corev1.PodReadyToStartContainers, true, "")
	setPodCondition(&st, corev1.PodInitialized, pr.initialized, "ContainersNotInitialized")
	setPodCondition(&st, corev1.ContainersReady, ready, "ContainersNotReady")
	setPodCondition(&st, corev1.PodReady, ready, "ContainersNotReady")
	setPodCondition(&st, corev1.PodScheduled, true, "")
	if phase == corev1.PodSucceeded || phase == corev1.PodFailed {
		setPodCondition(&st, corev1.ContainersReady, false, "PodCompleted")
		setPodCondition(&st, corev1.PodReady, false, "PodCompleted")
	}
	return st
}
