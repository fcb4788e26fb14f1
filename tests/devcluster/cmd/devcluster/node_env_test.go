package main

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/utils/ptr"
)

// fakeObjects serves ConfigMaps and Secrets from maps; a name in forbidden
// fails as the Node authorizer would.
type fakeObjects struct {
	configMaps map[string]map[string]string
	secrets    map[string]map[string][]byte
	forbidden  map[string]bool
}

func (f *fakeObjects) configMap(name string) (*corev1.ConfigMap, error) {
	if f.forbidden[name] {
		return nil, apierrors.NewForbidden(schema.GroupResource{Resource: "configmaps"}, name, nil)
	}
	data, ok := f.configMaps[name]
	if !ok {
		return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "configmaps"}, name)
	}
	return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: data}, nil
}

func (f *fakeObjects) secret(name string) (*corev1.Secret, error) {
	if f.forbidden[name] {
		return nil, apierrors.NewForbidden(schema.GroupResource{Resource: "secrets"}, name, nil)
	}
	data, ok := f.secrets[name]
	if !ok {
		return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, name)
	}
	return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name}, Data: data}, nil
}

func cmRef(name string, optional bool) *corev1.ConfigMapEnvSource {
	return &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}, Optional: ptr.To(optional)}
}

func secretRef(name string, optional bool) *corev1.SecretEnvSource {
	return &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}, Optional: ptr.To(optional)}
}

func testPod() *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", Labels: map[string]string{"app": "web"}}}
}

func baseForTest() *orderedEnv {
	base := newOrderedEnv()
	base.set("PATH", "/bin")
	base.set("HOSTNAME", "p")
	return base
}

func TestEnvFromOrderPrefixAndOverride(t *testing.T) {
	objs := &fakeObjects{
		configMaps: map[string]map[string]string{"cm": {"b": "2", "a": "1", "dotted.key": "x=y"}},
		secrets:    map[string]map[string][]byte{"s": {"P_a": []byte("from-secret"), "token": []byte("t0k")}},
	}
	c := &corev1.Container{
		EnvFrom: []corev1.EnvFromSource{
			{Prefix: "P_", ConfigMapRef: cmRef("cm", false)},
			{SecretRef: secretRef("absent", true)},
			{ConfigMapRef: cmRef("absent", true)},
			{SecretRef: secretRef("s", false)},
			{Prefix: "1-", ConfigMapRef: cmRef("cm", false)},
		},
		Env: []corev1.EnvVar{
			{Name: "P_b", Value: "env-wins"},
			{Name: "PATH", Value: "$(PATH):/extra"},
			{Name: "REF", Value: "$(token)-$(UNDEFINED)"},
			{Name: "APP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels['app']"}}},
		},
	}
	env, err := containerEnv(baseForTest(), testPod(), c, objs)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"PATH=/bin:/extra", "HOSTNAME=p",
		"P_a=from-secret", "P_b=env-wins", "P_dotted.key=x=y",
		"token=t0k",
		"1-a=1", "1-b=2", "1-dotted.key=x=y",
		"REF=t0k-$(UNDEFINED)", "APP=web",
	}
	if got := env.list(); !reflect.DeepEqual(got, want) {
		t.Fatalf("env:\n got %q\nwant %q", got, want)
	}
}

func TestEnvFromErrors(t *testing.T) {
	objs := &fakeObjects{
		configMaps: map[string]map[string]string{"cm": {"k": "v"}},
		forbidden:  map[string]bool{"denied": true},
	}
	keyRef := func(name, key string, optional bool) []corev1.EnvVar {
		return []corev1.EnvVar{{Name: "V", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: name}, Key: key, Optional: ptr.To(optional)}}}}
	}
	for _, tc := range []struct {
		name    string
		c       corev1.Container
		wantErr string // "" means no error
	}{
		{"missing configmap", corev1.Container{EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: cmRef("absent", false)}}}, `configmaps "absent" not found`},
		{"missing secret", corev1.Container{EnvFrom: []corev1.EnvFromSource{{SecretRef: secretRef("absent", false)}}}, `secrets "absent" not found`},
		{"optional only covers NotFound", corev1.Container{EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: cmRef("denied", true)}}}, "forbidden"},
		{"missing key", corev1.Container{Env: keyRef("cm", "nokey", false)}, "couldn't find key nokey in ConfigMap ns/cm"},
		{"optional missing key", corev1.Container{Env: keyRef("cm", "nokey", true)}, ""},
		{"optional missing configmap", corev1.Container{Env: keyRef("absent", "k", true)}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env, err := containerEnv(baseForTest(), testPod(), &tc.c, objs)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.wantErr == "":
				if _, set := env.m["V"]; set {
					t.Fatalf("optional missing source set V: %q", env.list())
				}
			case err == nil || !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}
