package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

type fakeClaims struct {
	pvcs map[string]*corev1.PersistentVolumeClaim
	pvs  map[string]*corev1.PersistentVolume
}

func (f fakeClaims) claim(name string) (*corev1.PersistentVolumeClaim, error) {
	if c, ok := f.pvcs[name]; ok {
		return c, nil
	}
	return nil, fmt.Errorf("not found")
}

func (f fakeClaims) persistentVolume(name string) (*corev1.PersistentVolume, error) {
	if v, ok := f.pvs[name]; ok {
		return v, nil
	}
	return nil, fmt.Errorf("not found")
}

func claimVolume(name string) *corev1.Volume {
	return &corev1.Volume{Name: "state", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: name}}}
}

func TestHostDirectoryOfBoundClaim(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pv")
	objs := fakeClaims{
		pvcs: map[string]*corev1.PersistentVolumeClaim{
			"bound":   {Spec: corev1.PersistentVolumeClaimSpec{VolumeName: "pv1"}, Status: corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimBound}},
			"pending": {Status: corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimPending}},
			"nfs":     {Spec: corev1.PersistentVolumeClaimSpec{VolumeName: "pv2"}, Status: corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimBound}},
		},
		pvs: map[string]*corev1.PersistentVolume{
			"pv1": {ObjectMeta: metav1.ObjectMeta{Name: "pv1"}, Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: dir}}}},
			"pv2": {ObjectMeta: metav1.ObjectMeta{Name: "pv2"}, Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{NFS: &corev1.NFSVolumeSource{Server: "x", Path: "/"}}}},
		},
	}
	got, ok, err := hostDirectory(claimVolume("bound"), objs)
	if !ok || err != nil || got != dir {
		t.Fatalf("bound claim: %q %v %v", got, ok, err)
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		t.Fatalf("the PV's directory must be created: %v", err)
	}
	for _, name := range []string{"pending", "nfs", "missing"} {
		if _, ok, err := hostDirectory(claimVolume(name), objs); !ok || err == nil {
			t.Errorf("claim %q: want an error, got ok=%v err=%v", name, ok, err)
		}
	}
	if _, ok, _ := hostDirectory(&corev1.Volume{Name: "e", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}, objs); ok {
		t.Fatal("emptyDir is not a host directory")
	}
}

func TestHostDirectoryOfHostPath(t *testing.T) {
	base := t.TempDir()
	hp := func(path string, typ corev1.HostPathType) *corev1.Volume {
		return &corev1.Volume{Name: "h", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path, Type: ptr.To(typ)}}}
	}
	if _, _, err := hostDirectory(hp(filepath.Join(base, "new"), corev1.HostPathDirectoryOrCreate), fakeClaims{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := hostDirectory(hp(filepath.Join(base, "absent"), corev1.HostPathDirectory), fakeClaims{}); err == nil {
		t.Fatal("type Directory needs the directory to exist")
	}
	if _, _, err := hostDirectory(hp("/dev/null", corev1.HostPathCharDev), fakeClaims{}); err == nil {
		t.Fatal("only directories are supported")
	}
}

func TestServiceHosts(t *testing.T) {
	svc := func(ns, name string) corev1.Service {
		return corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	}
	out := string(serviceHosts([]byte("127.0.0.1 localhost"), []corev1.Service{svc("cc", "proxy"), svc("other", "db")}, "cc"))
	if !strings.HasPrefix(out, "127.0.0.1 localhost\n") {
		t.Fatalf("the node's hosts come first: %q", out)
	}
	if !strings.Contains(out, "127.0.0.1 proxy.cc.svc proxy.cc.svc.cluster.local proxy.cc proxy\n") {
		t.Fatalf("own namespace's Service by every name: %q", out)
	}
	if !strings.Contains(out, "127.0.0.1 db.other.svc db.other.svc.cluster.local db.other\n") || strings.Contains(out, " db\n") {
		t.Fatalf("another namespace's Service not by its bare name: %q", out)
	}
}
