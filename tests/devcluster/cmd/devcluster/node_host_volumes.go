package main

import (
	"fmt"
	"os"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// hostPath and persistentVolumeClaim volumes are directories of the node's
// file system that outlive the pod. A claim must be Bound to a
// PersistentVolume of type hostPath or local (there is no provisioner: the
// test or the operator creates the PV, and the PV controller binds it); its
// directory is that volume's path. The pod's volumes/<name> is then a
// symlink to the directory, which container-init bind-mounts (mount(2)
// follows it), so what a pod writes there is found by the next pod.

// claimSources reads what a claim volume needs from the apiserver.
type claimSources interface {
	claim(name string) (*corev1.PersistentVolumeClaim, error)
	persistentVolume(name string) (*corev1.PersistentVolume, error)
}

func (o *apiEnvObjects) claim(name string) (*corev1.PersistentVolumeClaim, error) {
	return o.a.cs.CoreV1().PersistentVolumeClaims(o.ns).Get(o.ctx, name, metav1.GetOptions{})
}

func (o *apiEnvObjects) persistentVolume(name string) (*corev1.PersistentVolume, error) {
	return o.a.cs.CoreV1().PersistentVolumes().Get(o.ctx, name, metav1.GetOptions{})
}

// hostDirectory returns the node directory of a hostPath or claim volume
// (ok false for any other kind), creating it when its type allows.
func hostDirectory(v *corev1.Volume, objs claimSources) (dir string, ok bool, err error) {
	switch {
	case v.HostPath != nil:
		t := corev1.HostPathUnset
		if v.HostPath.Type != nil {
			t = *v.HostPath.Type
		}
		switch t {
		case corev1.HostPathUnset, corev1.HostPathDirectoryOrCreate:
			return v.HostPath.Path, true, os.MkdirAll(v.HostPath.Path, 0o755)
		case corev1.HostPathDirectory:
			st, err := os.Stat(v.HostPath.Path)
			if err == nil && !st.IsDir() {
				err = fmt.Errorf("hostPath %q is not a directory", v.HostPath.Path)
			}
			return v.HostPath.Path, true, err
		default:
			return "", true, fmt.Errorf("hostPath type %q is not supported (only directories)", t)
		}
	case v.PersistentVolumeClaim != nil:
		name := v.PersistentVolumeClaim.ClaimName
		pvc, err := objs.claim(name)
		if err != nil {
			return "", true, fmt.Errorf("persistentvolumeclaim %q: %w", name, err)
		}
		if pvc.Status.Phase != corev1.ClaimBound || pvc.Spec.VolumeName == "" {
			return "", true, fmt.Errorf("persistentvolumeclaim %q is not bound", name)
		}
		pv, err := objs.persistentVolume(pvc.Spec.VolumeName)
		if err != nil {
			return "", true, fmt.Errorf("persistentvolume %q: %w", pvc.Spec.VolumeName, err)
		}
		switch {
		case pv.Spec.HostPath != nil:
			dir = pv.Spec.HostPath.Path
		case pv.Spec.Local != nil:
			dir = pv.Spec.Local.Path
		default:
			return "", true, fmt.Errorf("persistentvolume %q: only hostPath and local volumes are supported", pv.Name)
		}
		return dir, true, os.MkdirAll(dir, 0o755)
	}
	return "", false, nil
}
