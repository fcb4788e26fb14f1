package clusterconnect_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"

	clusterconnect "github.com/clusterconnect/clusterconnect/clients/go"
)

// These tests reach a real cluster through a running relay, agent and auth proxy (no client proxy):
// tests/test_go_client.py starts them on the devcluster and sets the environment. Without it they
// skip.
type target struct {
	relay, relayCA, cluster, tokenFile string
	namespace, shellPod, echoPod       string
	echoPort                           int
}

func e2e(t *testing.T) (target, *rest.Config, *kubernetes.Clientset) {
	t.Helper()
	env := func(name string) string { return os.Getenv("CLUSTERCONNECT_TEST_" + name) }
	if env("RELAY") == "" {
		t.Skip("CLUSTERCONNECT_TEST_RELAY is not set: run through tests/test_go_client.py")
	}
	port, err := strconv.Atoi(env("ECHO_PORT"))
	if err != nil {
		t.Fatalf("CLUSTERCONNECT_TEST_ECHO_PORT: %v", err)
	}
	tgt := target{env("RELAY"), env("RELAY_CA"), env("CLUSTER"), env("TOKEN_FILE"),
		env("NAMESPACE"), env("SHELL_POD"), env("ECHO_POD"), port}
	relay, err := clusterconnect.ConnectRelay(tgt.relay, tgt.relayCA)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = relay.Close() })
	config := clusterconnect.RESTConfig(relay, tgt.cluster, clusterconnect.TokenFile(tgt.tokenFile))
	return tgt, config, kubernetes.NewForConfigOrDie(config)
}

func deadline(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestListPods(t *testing.T) {
	tgt, _, client := e2e(t)
	pods, err := client.CoreV1().Pods(tgt.namespace).List(deadline(t), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, pod := range pods.Items {
		names[pod.Name] = true
	}
	if !names[tgt.shellPod] || !names[tgt.echoPod] {
		t.Fatalf("pods in %s: %v; want %s and %s", tgt.namespace, names, tgt.shellPod, tgt.echoPod)
	}
}

// A watch opened before a ConfigMap is created sees it being added.
func TestWatch(t *testing.T) {
	tgt, _, client := e2e(t)
	ctx := deadline(t)
	configMaps := client.CoreV1().ConfigMaps(tgt.namespace)
	name := fmt.Sprintf("go-client-watch-%d", time.Now().UnixNano())
	watcher, err := configMaps.Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Stop()
	if _, err := configMaps.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name},
		Data: map[string]string{"via": "tunnel"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = configMaps.Delete(context.Background(), name, metav1.DeleteOptions{}) }()
	for {
		select {
		case event, ok := <-watcher.ResultChan():
			if !ok {
				t.Fatal("the watch ended before the ConfigMap was added")
			}
			if cm, isCM := event.Object.(*corev1.ConfigMap); event.Type == watch.Added && isCM && cm.Name == name {
				if cm.Data["via"] != "tunnel" {
					t.Fatalf("data: %v", cm.Data)
				}
				return
			}
		case <-ctx.Done():
			t.Fatal("no ADDED event for the ConfigMap")
		}
	}
}

// exec over WebSocket (the v5 protocol): stdin reaches the command, its end closes the command's
// stdin, and stdout and stderr come back apart.
func TestExecWebSocket(t *testing.T) {
	tgt, config, client := e2e(t)
	request := client.CoreV1().RESTClient().Post().Resource("pods").Namespace(tgt.namespace).
		Name(tgt.shellPod).SubResource("exec").VersionedParams(&corev1.PodExecOptions{
		Command: []string{"sh", "-c", "tr a-z A-Z; echo done >&2"},
		Stdin:   true, Stdout: true, Stderr: true,
	}, scheme.ParameterCodec)
	executor, err := remotecommand.NewWebSocketExecutor(config, "GET", request.URL().String())
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	err = executor.StreamWithContext(deadline(t), remotecommand.StreamOptions{
		Stdin: strings.NewReader("hello through the tunnel\n"), Stdout: &stdout, Stderr: &stderr,
	})
	if err != nil {
		t.Fatalf("exec: %v (stderr %q)", err, stderr.String())
	}
	if stdout.String() != "HELLO THROUGH THE TUNNEL\n" || stderr.String() != "done\n" {
		t.Fatalf("stdout %q, stderr %q", stdout.String(), stderr.String())
	}
}

// port-forward over WebSocket to the echo pod: 8 MiB each way, compared by SHA-256.
func TestPortForwardWebSocket(t *testing.T) {
	tgt, config, client := e2e(t)
	request := client.CoreV1().RESTClient().Post().Resource("pods").Namespace(tgt.namespace).
		Name(tgt.echoPod).SubResource("portforward")
	dialer, err := portforward.NewSPDYOverWebsocketDialer(request.URL(), config)
	if err != nil {
		t.Fatal(err)
	}
	stop, ready := make(chan struct{}), make(chan struct{})
	var logs bytes.Buffer
	forwarder, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"},
		[]string{fmt.Sprintf("0:%d", tgt.echoPort)}, stop, ready, &logs, &logs)
	if err != nil {
		t.Fatal(err)
	}
	forwarded := make(chan error, 1)
	go func() { forwarded <- forwarder.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-forwarded:
		t.Fatalf("port-forward ended before it was ready: %v (%s)", err, logs.String())
	case <-deadline(t).Done():
		close(stop)
		t.Fatalf("port-forward not ready; it ended with %v", <-forwarded)
	}
	defer func() {
		close(stop)
		if err := <-forwarded; err != nil {
			t.Errorf("port-forward: %v", err)
		}
	}()
	ports, err := forwarder.GetPorts()
	if err != nil {
		t.Fatal(err)
	}
	local, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", ports[0].Local))
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	_ = local.SetDeadline(time.Now().Add(60 * time.Second))

	const size = 8 << 20
	block := bytes.Repeat([]byte("clusterconnect port-forward "), 1<<12)
	sent := sha256.New()
	wrote := make(chan error, 1)
	go func() {
		remaining := size
		for counter := 0; remaining > 0; counter++ {
			piece := append([]byte(strconv.Itoa(counter)), block...)[:min(len(block), remaining)]
			sent.Write(piece)
			if _, err := local.Write(piece); err != nil {
				wrote <- err
				return
			}
			remaining -= len(piece)
		}
		wrote <- local.(*net.TCPConn).CloseWrite()
	}()
	received := sha256.New()
	n, err := io.Copy(received, local)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if n != size || !bytes.Equal(received.Sum(nil), sent.Sum(nil)) {
		t.Fatalf("echo: %d bytes back of %d, checksums equal: %v", n, size, bytes.Equal(received.Sum(nil), sent.Sum(nil)))
	}
}

// The real relay's refusal reaches the caller as its status.
func TestDialUnknownCluster(t *testing.T) {
	tgt, _, _ := e2e(t)
	relay, err := clusterconnect.ConnectRelay(tgt.relay, tgt.relayCA)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	_, err = clusterconnect.Dial(deadline(t), relay, "no-such-cluster", clusterconnect.TokenFile(tgt.tokenFile))
	// PERMISSION_DENIED, as for a cluster that does not admit the caller: nobody learns which exist.
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "no-such-cluster") {
		t.Fatalf("want PERMISSION_DENIED naming the cluster, got %v", err)
	}
}
