package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
)

const nodeIP = "127.0.0.1"

// nodeAgent is a minimal "kubelet" that runs pod containers as local
// processes.
type nodeAgent struct {
	name    string
	port    int
	podsDir string
	cs      kubernetes.Interface
	ctx     context.Context
	started time.Time
	// apiHost/apiPort are where pods reach the apiserver (in-cluster config).
	apiHost, apiPort string

	mu    sync.Mutex
	pods  map[types.UID]*podRuntime
	names map[string]*podRuntime // "ns/name" -> pod
}

func runNode(args []string) int {
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the node identity (system:node:NAME)")
	nodeName := fs.String("node-name", defaultNodeName, "node name")
	port := fs.Int("port", 10250, "kubelet API port (on 127.0.0.1)")
	certFile := fs.String("tls-cert-file", "", "kubelet serving certificate")
	keyFile := fs.String("tls-private-key-file", "", "kubelet serving key")
	caFile := fs.String("client-ca-file", "", "CA for verifying client certificates")
	podsDir := fs.String("pods-dir", "", "directory for per-pod working directories")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *kubeconfig == "" || *certFile == "" || *keyFile == "" || *caFile == "" || *podsDir == "" {
		fmt.Fprintln(os.Stderr, "node: --kubeconfig, --tls-cert-file, --tls-private-key-file, --client-ca-file and --pods-dir are required")
		return 2
	}
	if err := os.MkdirAll(*podsDir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "node: %v\n", err)
		return 1
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "node: %v\n", err)
		return 1
	}
	cfg.QPS = 50
	cfg.Burst = 100
	cfg.UserAgent = "devcluster-node"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "node: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	apiHost, apiPort, err := apiserverHostPort(cfg.Host)
	if err != nil {
		fmt.Fprintf(os.Stderr, "node: %v\n", err)
		return 1
	}
	a := &nodeAgent{
		name: *nodeName, port: *port, podsDir: *podsDir, cs: cs, ctx: ctx, started: time.Now(),
		apiHost: apiHost, apiPort: apiPort,
		pods: map[types.UID]*podRuntime{}, names: map[string]*podRuntime{},
	}

	srvErr := make(chan error, 1)
	srv, err := a.serveKubeletAPI(*certFile, *keyFile, *caFile, srvErr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "node: kubelet API: %v\n", err)
		return 1
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	go a.registerAndHeartbeat()
	go a.watchPods()

	code := 0
	select {
	case s := <-sigs:
		logf("got %v, stopping all pods", s)
	case err := <-srvErr:
		logf("kubelet API server failed: %v", err)
		code = 1
	}
	srv.Close()
	a.killAll()
	cancel()
	return code
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s node: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, a...))
}

func (a *nodeAgent) nodeObject() *corev1.Node {
	rl := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("8"),
		corev1.ResourceMemory:           resource.MustParse("16Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: a.name,
			Labels: map[string]string{
				"kubernetes.io/hostname": a.name,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     runtime.GOARCH,
				"beta.kubernetes.io/os":  "linux",
				"devcluster.io/node":     "true",
			},
		},
		Status: a.nodeStatus(rl),
	}
}

func (a *nodeAgent) nodeStatus(rl corev1.ResourceList) corev1.NodeStatus {
	if rl == nil {
		rl = a.nodeObject().Status.Capacity
	}
	now := metav1.Now()
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, LastHeartbeatTime: now, LastTransitionTime: metav1.NewTime(a.started), Reason: reason, Message: msg}
	}
	return corev1.NodeStatus{
		Capacity:    rl,
		Allocatable: rl,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "devcluster node has sufficient memory"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "devcluster node has no disk pressure"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "devcluster node has sufficient PID available"),
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "devcluster node is posting ready status"),
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: nodeIP},
			{Type: corev1.NodeHostName, Address: a.name},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(a.port)}},
		NodeInfo: corev1.NodeSystemInfo{
			MachineID:               "devcluster",
			SystemUUID:              "devcluster",
			BootID:                  fmt.Sprintf("devcluster-%d", a.started.UnixNano()),
			KernelVersion:           kernelVersion(),
			OSImage:                 "devcluster process node",
			ContainerRuntimeVersion: "devcluster://0.1.0",
			KubeletVersion:          "v1.37.2",
			OperatingSystem:         "linux",
			Architecture:            runtime.GOARCH,
		},
	}
}

// registerAndHeartbeat creates the Node (retrying until the apiserver is up),
// then keeps the Lease and the Ready condition fresh.
func (a *nodeAgent) registerAndHeartbeat() {
	ctx := a.ctx
	for {
		err := a.register(ctx)
		if err == nil {
			break
		}
		logf("register node: %v (retrying)", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
	logf("node %s registered and Ready", a.name)
	leaseTick := time.NewTicker(10 * time.Second)
	statusTick := time.NewTicker(15 * time.Second)
	defer leaseTick.Stop()
	defer statusTick.Stop()
	a.renewLease(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-leaseTick.C:
			a.renewLease(ctx)
		case <-statusTick.C:
			if err := a.updateNodeStatus(ctx); err != nil {
				logf("update node status: %v", err)
			}
		}
	}
}

func (a *nodeAgent) register(ctx context.Context) error {
	c, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := a.cs.CoreV1().Nodes().Create(c, a.nodeObject(), metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	// Status may be dropped on create; always set it explicitly.
	return a.updateNodeStatus(c)
}

func (a *nodeAgent) updateNodeStatus(ctx context.Context) error {
	for i := 0; i < 5; i++ {
		n, err := a.cs.CoreV1().Nodes().Get(ctx, a.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Status = a.nodeStatus(nil)
		_, err = a.cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue
		}
		return err
	}
	return fmt.Errorf("too many conflicts")
}

func (a *nodeAgent) renewLease(ctx context.Context) {
	c, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	leases := a.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	l, err := leases.Get(c, a.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: a.name, Namespace: corev1.NamespaceNodeLease},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(a.name),
				LeaseDurationSeconds: ptr.To(int32(40)),
				RenewTime:            &now,
			},
		}
		if n, err := a.cs.CoreV1().Nodes().Get(c, a.name, metav1.GetOptions{}); err == nil {
			l.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}}
		}
		if _, err := leases.Create(c, l, metav1.CreateOptions{}); err != nil {
			logf("create lease: %v", err)
		}
		return
	}
	if err != nil {
		logf("get lease: %v", err)
		return
	}
	l.Spec.HolderIdentity = ptr.To(a.name)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(40))
	l.Spec.RenewTime = &now
	if _, err := leases.Update(c, l, metav1.UpdateOptions{}); err != nil {
		logf("renew lease: %v", err)
	}
}

// watchPods runs an informer over the pods bound to this node.
func (a *nodeAgent) watchPods() {
	factory := informers.NewSharedInformerFactoryWithOptions(a.cs, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.name).String()
		}))
	inf := factory.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.podChanged(obj.(*corev1.Pod)) },
		UpdateFunc: func(_, obj any) { a.podChanged(obj.(*corev1.Pod)) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				a.podDeleted(p)
			}
		},
	})
	factory.Start(a.ctx.Done())
	<-a.ctx.Done()
}

func (a *nodeAgent) lookup(ns, name string) *podRuntime {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.names[ns+"/"+name]
}

func (a *nodeAgent) podChanged(p *corev1.Pod) {
	a.mu.Lock()
	pr, ok := a.pods[p.UID]
	if !ok {
		if p.DeletionTimestamp == nil && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			pr = newPodRuntime(a, p)
			a.pods[p.UID] = pr
			a.names[p.Namespace+"/"+p.Name] = pr
			a.mu.Unlock()
			go pr.run()
			return
		}
		a.mu.Unlock()
		if p.DeletionTimestamp != nil {
			// A pod we are not running (e.g. already finished): just let it go.
			go a.finalDelete(p.Namespace, p.Name, p.UID)
		}
		return
	}
	a.mu.Unlock()
	pr.setPod(p)
	if p.DeletionTimestamp != nil {
		grace := int64(30)
		if p.DeletionGracePeriodSeconds != nil {
			grace = *p.DeletionGracePeriodSeconds
		}
		pr.terminate(time.Duration(grace)*time.Second, true)
	}
}

func (a *nodeAgent) podDeleted(p *corev1.Pod) {
	a.mu.Lock()
	pr, ok := a.pods[p.UID]
	a.mu.Unlock()
	if ok {
		pr.terminate(0, false)
	}
}

func (a *nodeAgent) forget(pr *podRuntime) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.pods, pr.uid)
	if a.names[pr.key] == pr {
		delete(a.names, pr.key)
	}
}

func (a *nodeAgent) finalDelete(ns, name string, uid types.UID) {
	for attempt := 0; attempt < 20; attempt++ {
		ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
		err := a.cs.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{
			GracePeriodSeconds: ptr.To(int64(0)),
			Preconditions:      &metav1.Preconditions{UID: &uid},
		})
		cancel()
		if err == nil || apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			// Conflict: the UID precondition failed, i.e. a new pod with
			// the same name exists; ours is gone.
			return
		}
		logf("delete pod %s/%s: %v (retrying)", ns, name, err)
		select {
		case <-a.ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// killAll kills every pod process immediately (node shutdown).
func (a *nodeAgent) killAll() {
	a.mu.Lock()
	prs := make([]*podRuntime, 0, len(a.pods))
	for _, pr := range a.pods {
		prs = append(prs, pr)
	}
	a.mu.Unlock()
	var wg sync.WaitGroup
	for _, pr := range prs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pr.killNow()
		}()
	}
	wg.Wait()
}

func kernelVersion() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return ""
	}
	b := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}
