package main

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
)

// A container's environment follows the kubelet's makeEnvironmentVariables
// (k8s.io/kubernetes v1.37 pkg/kubelet/kubelet_pods.go): envFrom entries in
// order (a later one overrides an earlier one), then env entries, which
// override both. Names are not checked: since RelaxedEnvironmentVariableValidation
// went GA the kubelet passes every ConfigMap/Secret key on (the Conformance
// tests use prefixes such as "1-" and "#@!").

// configRetry is how soon a container whose environment cannot be built (a
// missing ConfigMap, say) is tried again. The kubelet retries its pod sync
// about every 10 s; tests should not wait that long.
const configRetry = time.Second

// envObjects reads the ConfigMaps and Secrets a container refers to, each
// at most once per environment, as the kubelet does.
type envObjects interface {
	configMap(name string) (*corev1.ConfigMap, error)
	secret(name string) (*corev1.Secret, error)
}

// apiEnvObjects reads them from the apiserver (the Node authorizer lets the
// node get the objects its pods refer to).
type apiEnvObjects struct {
	a          *nodeAgent
	ctx        context.Context
	ns         string
	configMaps map[string]*corev1.ConfigMap
	secrets    map[string]*corev1.Secret
}

func newAPIEnvObjects(ctx context.Context, a *nodeAgent, ns string) *apiEnvObjects {
	return &apiEnvObjects{a: a, ctx: ctx, ns: ns, configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{}}
}

func (o *apiEnvObjects) configMap(name string) (*corev1.ConfigMap, error) {
	if cm, ok := o.configMaps[name]; ok {
		return cm, nil
	}
	cm, err := o.a.cs.CoreV1().ConfigMaps(o.ns).Get(o.ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	o.configMaps[name] = cm
	return cm, nil
}

func (o *apiEnvObjects) secret(name string) (*corev1.Secret, error) {
	if s, ok := o.secrets[name]; ok {
		return s, nil
	}
	s, err := o.a.cs.CoreV1().Secrets(o.ns).Get(o.ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	o.secrets[name] = s
	return s, nil
}

// orderedEnv is an environment that keeps the order in which names first appeared.
type orderedEnv struct {
	m     map[string]string
	order []string
}

func newOrderedEnv() *orderedEnv { return &orderedEnv{m: map[string]string{}} }

func (e *orderedEnv) set(k, v string) {
	if _, ok := e.m[k]; !ok {
		e.order = append(e.order, k)
	}
	e.m[k] = v
}

func (e *orderedEnv) list() []string {
	env := make([]string, 0, len(e.order))
	for _, k := range e.order {
		env = append(env, k+"="+e.m[k])
	}
	return env
}

// isOptional reports whether a reference marked optional may be skipped
// after err: only when the object does not exist, like the kubelet.
func isOptional(optional *bool, err error) bool {
	return optional != nil && *optional && apierrors.IsNotFound(err)
}

// setSorted adds data under prefix; sorted so that the process environment
// is the same on every start (the kubelet's order is a map's).
func setSorted[V any](env *orderedEnv, prefix string, data map[string]V, str func(V) string) {
	keys := make([]string, 0, len(data))
	for k := range data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env.set(prefix+k, str(data[k]))
	}
}

// containerEnv computes the environment of container c of pod p on top of
// base. An error (a missing non-optional ConfigMap, Secret or key) means the
// container cannot start yet: CreateContainerConfigError.
func containerEnv(base *orderedEnv, p *corev1.Pod, c *corev1.Container, objs envObjects) (*orderedEnv, error) {
	env := newOrderedEnv()
	for _, k := range base.order {
		env.set(k, base.m[k])
	}
	for _, ef := range c.EnvFrom {
		switch {
		case ef.ConfigMapRef != nil:
			cm, err := objs.configMap(ef.ConfigMapRef.Name)
			if err != nil {
				if isOptional(ef.ConfigMapRef.Optional, err) {
					continue
				}
				return nil, err
			}
			setSorted(env, ef.Prefix, cm.Data, func(v string) string { return v })
		case ef.SecretRef != nil:
			s, err := objs.secret(ef.SecretRef.Name)
			if err != nil {
				if isOptional(ef.SecretRef.Optional, err) {
					continue
				}
				return nil, err
			}
			setSorted(env, ef.Prefix, s.Data, func(v []byte) string { return string(v) })
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil || e.Value != "" {
			env.set(e.Name, expansion.Expand(e.Value, expansion.MappingFuncFor(env.m)))
			continue
		}
		v, ok, err := valueFrom(p, e.ValueFrom, objs)
		if err != nil {
			return nil, err
		}
		if ok {
			env.set(e.Name, v)
		}
	}
	return env, nil
}

// valueFrom resolves one env entry's source; ok is false when an optional
// source is missing and the variable is left out.
func valueFrom(p *corev1.Pod, vf *corev1.EnvVarSource, objs envObjects) (v string, ok bool, err error) {
	switch {
	case vf.FieldRef != nil:
		return fieldRefValue(p, vf.FieldRef.FieldPath), true, nil
	case vf.ConfigMapKeyRef != nil:
		ref := vf.ConfigMapKeyRef
		cm, err := objs.configMap(ref.Name)
		if err != nil {
			if isOptional(ref.Optional, err) {
				return "", false, nil
			}
			return "", false, err
		}
		v, found := cm.Data[ref.Key]
		if !found {
			if ref.Optional != nil && *ref.Optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("couldn't find key %v in ConfigMap %v/%v", ref.Key, p.Namespace, ref.Name)
		}
		return v, true, nil
	case vf.SecretKeyRef != nil:
		ref := vf.SecretKeyRef
		s, err := objs.secret(ref.Name)
		if err != nil {
			if isOptional(ref.Optional, err) {
				return "", false, nil
			}
			return "", false, err
		}
		b, found := s.Data[ref.Key]
		if !found {
			if ref.Optional != nil && *ref.Optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("couldn't find key %v in Secret %v/%v", ref.Key, p.Namespace, ref.Name)
		}
		return string(b), true, nil
	case vf.ResourceFieldRef != nil:
		// Resources are ignored, so there are no limits to report.
		return "0", true, nil
	}
	return "", true, nil
}

func fieldRefValue(p *corev1.Pod, fieldPath string) string {
	switch fieldPath {
	case "metadata.name":
		return p.Name
	case "metadata.namespace":
		return p.Namespace
	case "metadata.uid":
		return string(p.UID)
	case "spec.nodeName":
		return p.Spec.NodeName
	case "spec.serviceAccountName":
		return p.Spec.ServiceAccountName
	case "status.podIP", "status.hostIP", "status.podIPs", "status.hostIPs":
		return nodeIP
	}
	if key, ok := strings.CutPrefix(fieldPath, "metadata.labels['"); ok {
		return p.Labels[strings.TrimSuffix(key, "']")]
	}
	if key, ok := strings.CutPrefix(fieldPath, "metadata.annotations['"); ok {
		return p.Annotations[strings.TrimSuffix(key, "']")]
	}
	return ""
}

// baseEnv is what every container gets before its own env: what an image
// would provide, taken from the node's environment.
func (pr *podRuntime) baseEnv(p *corev1.Pod) *orderedEnv {
	env := newOrderedEnv()
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	env.set("PATH", path)
	if h := os.Getenv("HOME"); h != "" {
		env.set("HOME", h)
	} else {
		env.set("HOME", pr.dir)
	}
	env.set("HOSTNAME", p.Name)
	for _, k := range []string{"LANG", "LC_ALL", "TMPDIR", "USER"} {
		if v, ok := os.LookupEnv(k); ok {
			env.set(k, v)
		}
	}
	setKubernetesServiceEnv(env, pr.a.apiHost, pr.a.apiPort)
	return env
}

// setKubernetesServiceEnv adds the variables the kubelet derives from the
// default/kubernetes Service, which client-go's rest.InClusterConfig reads.
// They point at the apiserver itself: the Service has no endpoints and there
// is no kube-proxy (see "Apiserver quirks").
func setKubernetesServiceEnv(env *orderedEnv, host, port string) {
	if host == "" {
		return
	}
	hostPort := net.JoinHostPort(host, port)
	env.set("KUBERNETES_SERVICE_HOST", host)
	env.set("KUBERNETES_SERVICE_PORT", port)
	env.set("KUBERNETES_SERVICE_PORT_HTTPS", port)
	env.set("KUBERNETES_PORT", "tcp://"+hostPort)
	env.set("KUBERNETES_PORT_"+port+"_TCP", "tcp://"+hostPort)
	env.set("KUBERNETES_PORT_"+port+"_TCP_PROTO", "tcp")
	env.set("KUBERNETES_PORT_"+port+"_TCP_PORT", port)
	env.set("KUBERNETES_PORT_"+port+"_TCP_ADDR", host)
}

// apiserverHostPort splits the node's apiserver URL (https://127.0.0.1:PORT).
func apiserverHostPort(server string) (host, port string, err error) {
	u, err := url.Parse(server)
	if err != nil || u.Host == "" {
		return "", "", fmt.Errorf("apiserver address %q is not a URL", server)
	}
	port = u.Port()
	if port == "" {
		port = "443"
	}
	return u.Hostname(), port, nil
}

// buildEnv computes the process environment of a container from the
// current objects; it runs before every start, so a restarted container
// sees changed ConfigMaps and Secrets, as with the kubelet.
func (pr *podRuntime) buildEnv(c *containerRuntime) error {
	pr.mu.Lock()
	p := pr.pod // setPod replaces the pointer, never the object
	pr.mu.Unlock()
	ctx, cancel := context.WithTimeout(pr.a.ctx, 10*time.Second)
	defer cancel()
	env, err := containerEnv(pr.baseEnv(p), p, &c.spec, newAPIEnvObjects(ctx, pr.a, p.Namespace))
	if err != nil {
		return err
	}
	pr.mu.Lock()
	c.env = env.list()
	c.envMap = env.m
	pr.mu.Unlock()
	return nil
}

// awaitEnv builds the container's environment, retrying while it cannot be
// built (status: waiting, CreateContainerConfigError). False means the pod
// is stopping.
func (pr *podRuntime) awaitEnv(c *containerRuntime) bool {
	return pr.retryUntilDone(func() error { return pr.buildEnv(c) }, &c.configErr, "env for "+c.spec.Name)
}

// retryUntilDone runs step every configRetry until it succeeds. Its error
// is kept in *reason (under pr.mu, shown in the pod's status; empty once
// it works), logged and pushed each time it changes. False means the pod
// is stopping.
func (pr *podRuntime) retryUntilDone(step func() error, reason *string, what string) bool {
	for {
		err := step()
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		pr.mu.Lock()
		changed := *reason != msg
		*reason = msg
		pr.mu.Unlock()
		if changed {
			if err != nil {
				logf("pod %s: %s: %v", pr.key, what, err)
			}
			pr.markDirty()
		}
		if err == nil {
			return true
		}
		select {
		case <-pr.stopCh:
			return false
		case <-time.After(configRetry):
		}
	}
}
