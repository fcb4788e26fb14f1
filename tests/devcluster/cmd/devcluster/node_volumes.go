package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A pod's volumes are directories under <pod dir>/volumes/<name>, written
// once before the first container starts (the kubelet's volume manager
// also mounts before any container runs). Each container then gets them
// bind-mounted at their mountPath in its own mount namespace (see
// node_container_init.go). The directory is root-only: it holds Secrets
// and tokens, and every container runs as root.

// defaultTokenExpiry is what the kubelet asks for when a projected token
// source does not say (the ServiceAccount admission sets 3607 s).
const defaultTokenExpiry = int64(3600)

// volumeSources reads the objects volumes refer to and requests tokens.
type volumeSources interface {
	envObjects
	token(sa string, req *authenticationv1.TokenRequest) (string, error)
}

type apiVolumeSources struct {
	*apiEnvObjects
}

func (s apiVolumeSources) token(sa string, req *authenticationv1.TokenRequest) (string, error) {
	// The Node authorizer lets a node request tokens only for the
	// ServiceAccount of a pod bound to it, bound to that pod.
	tr, err := s.a.cs.CoreV1().ServiceAccounts(s.ns).CreateToken(s.ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// volumeFile is one file of a Secret, ConfigMap, downwardAPI or projected volume.
type volumeFile struct {
	path string // relative to the volume directory
	data []byte
	mode os.FileMode
}

func fileMode(item *int32, def *int32) os.FileMode {
	switch {
	case item != nil:
		return os.FileMode(*item)
	case def != nil:
		return os.FileMode(*def)
	}
	return 0o644
}

// keyFiles maps data to files: every key, or only items (a missing item
// key is an error unless optional).
func keyFiles(kind, name string, data map[string][]byte, items []corev1.KeyToPath, optional *bool, defMode *int32) ([]volumeFile, error) {
	var files []volumeFile
	if len(items) == 0 {
		for k, v := range data {
			files = append(files, volumeFile{path: k, data: v, mode: fileMode(nil, defMode)})
		}
		return files, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional != nil && *optional {
				continue
			}
			return nil, fmt.Errorf("%s %q has no key %q", kind, name, it.Key)
		}
		files = append(files, volumeFile{path: it.Path, data: v, mode: fileMode(it.Mode, defMode)})
	}
	return files, nil
}

func configMapData(cm *corev1.ConfigMap) map[string][]byte {
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return data
}

func configMapFiles(src *corev1.ConfigMapVolumeSource, p *corev1.Pod, objs volumeSources, defMode *int32) ([]volumeFile, error) {
	cm, err := objs.configMap(src.Name)
	if err != nil {
		if isOptional(src.Optional, err) {
			return nil, nil
		}
		return nil, fmt.Errorf("configmap %q: %w", src.Name, err)
	}
	return keyFiles("configmap", src.Name, configMapData(cm), src.Items, src.Optional, defMode)
}

func secretFiles(name string, items []corev1.KeyToPath, optional *bool, objs volumeSources, defMode *int32) ([]volumeFile, error) {
	s, err := objs.secret(name)
	if err != nil {
		if isOptional(optional, err) {
			return nil, nil
		}
		return nil, fmt.Errorf("secret %q: %w", name, err)
	}
	return keyFiles("secret", name, s.Data, items, optional, defMode)
}

func downwardAPIFiles(items []corev1.DownwardAPIVolumeFile, p *corev1.Pod, defMode *int32) []volumeFile {
	var files []volumeFile
	for _, it := range items {
		v := "0" // resourceFieldRef: resources are ignored, so there are no limits
		if it.FieldRef != nil {
			v = fieldRefValue(p, it.FieldRef.FieldPath)
		}
		files = append(files, volumeFile{path: it.Path, data: []byte(v), mode: fileMode(it.Mode, defMode)})
	}
	return files
}

func tokenFile(src *corev1.ServiceAccountTokenProjection, p *corev1.Pod, objs volumeSources, defMode *int32) (volumeFile, error) {
	expiry := defaultTokenExpiry
	if src.ExpirationSeconds != nil {
		expiry = *src.ExpirationSeconds
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: &expiry,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
	}}
	if src.Audience != "" {
		req.Spec.Audiences = []string{src.Audience}
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	tok, err := objs.token(sa, req)
	if err != nil {
		return volumeFile{}, fmt.Errorf("token for serviceaccount %q: %w", sa, err)
	}
	// A token is a secret: 0600 unless the pod asks otherwise.
	mode := os.FileMode(0o600)
	if defMode != nil {
		mode = os.FileMode(*defMode)
	}
	return volumeFile{path: src.Path, data: []byte(tok), mode: mode}, nil
}

func projectedFiles(src *corev1.ProjectedVolumeSource, p *corev1.Pod, objs volumeSources) ([]volumeFile, error) {
	var files []volumeFile
	for _, s := range src.Sources {
		var fs []volumeFile
		var err error
		switch {
		case s.ServiceAccountToken != nil:
			var f volumeFile
			f, err = tokenFile(s.ServiceAccountToken, p, objs, src.DefaultMode)
			fs = []volumeFile{f}
		case s.ConfigMap != nil:
			fs, err = configMapFiles(&corev1.ConfigMapVolumeSource{LocalObjectReference: s.ConfigMap.LocalObjectReference,
				Items: s.ConfigMap.Items, Optional: s.ConfigMap.Optional}, p, objs, src.DefaultMode)
		case s.Secret != nil:
			fs, err = secretFiles(s.Secret.Name, s.Secret.Items, s.Secret.Optional, objs, src.DefaultMode)
		case s.DownwardAPI != nil:
			fs = downwardAPIFiles(s.DownwardAPI.Items, p, src.DefaultMode)
		default:
			return nil, fmt.Errorf("unsupported projected volume source")
		}
		if err != nil {
			return nil, err
		}
		files = append(files, fs...)
	}
	return files, nil
}

// volumeFiles computes the files of an API-data volume; isDir reports a
// plain directory volume (emptyDir) that has no files.
func volumeFiles(v *corev1.Volume, p *corev1.Pod, objs volumeSources) (files []volumeFile, isDir bool, err error) {
	switch {
	case v.EmptyDir != nil:
		return nil, true, nil
	case v.Secret != nil:
		files, err = secretFiles(v.Secret.SecretName, v.Secret.Items, v.Secret.Optional, objs, v.Secret.DefaultMode)
	case v.ConfigMap != nil:
		files, err = configMapFiles(v.ConfigMap, p, objs, v.ConfigMap.DefaultMode)
	case v.DownwardAPI != nil:
		files = downwardAPIFiles(v.DownwardAPI.Items, p, v.DownwardAPI.DefaultMode)
	case v.Projected != nil:
		files, err = projectedFiles(v.Projected, p, objs)
	default:
		return nil, false, fmt.Errorf("volume %q: only emptyDir, secret, configMap, downwardAPI, projected, hostPath and persistentVolumeClaim volumes are supported", v.Name)
	}
	return files, false, err
}

// writeVolumeFiles writes files below dir, refusing paths that leave it
// (the apiserver validates item paths; this is the node's own check).
func writeVolumeFiles(dir string, files []volumeFile) error {
	for _, f := range files {
		clean := filepath.Clean(f.path)
		if filepath.IsAbs(clean) || clean == "." || clean == ".." || strings.HasPrefix(clean, "../") {
			return fmt.Errorf("file path %q leaves the volume", f.path)
		}
		target := filepath.Join(dir, clean)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(target, f.data, f.mode); err != nil {
			return err
		}
		// WriteFile applies the umask; the mode is what the pod asked for.
		if err := os.Chmod(target, f.mode); err != nil {
			return err
		}
	}
	return nil
}

func (pr *podRuntime) volumesDir() string { return filepath.Join(pr.dir, "volumes") }

// prepareVolumes writes every volume of the pod. A volume that is already
// complete is kept (emptyDir content must survive; the others are written
// once per pod, so Secret updates and token rotation are not seen).
func (pr *podRuntime) prepareVolumes() error {
	pr.mu.Lock()
	p := pr.pod
	pr.mu.Unlock()
	ctx, cancel := context.WithTimeout(pr.a.ctx, 10*time.Second)
	defer cancel()
	objs := apiVolumeSources{newAPIEnvObjects(ctx, pr.a, p.Namespace)}
	if err := os.MkdirAll(pr.volumesDir(), 0o700); err != nil {
		return err
	}
	for i := range p.Spec.Volumes {
		v := &p.Spec.Volumes[i]
		final := filepath.Join(pr.volumesDir(), v.Name)
		if _, err := os.Stat(final); err == nil {
			continue
		}
		if dir, ok, err := hostDirectory(v, objs); ok {
			if err != nil {
				return fmt.Errorf("volume %q: %w", v.Name, err)
			}
			_ = os.Remove(final) // a dangling link from an earlier try
			if err := os.Symlink(dir, final); err != nil {
				return err
			}
			continue
		}
		files, isDir, err := volumeFiles(v, p, objs)
		if err != nil {
			return fmt.Errorf("volume %q: %w", v.Name, err)
		}
		if isDir {
			// emptyDir is writable by whoever the container runs as, like the kubelet's 0777.
			if err := os.Mkdir(final, 0o777); err != nil {
				return err
			}
			if err := os.Chmod(final, 0o777); err != nil {
				return err
			}
			continue
		}
		// Written aside and renamed, so a half-written volume is never mounted.
		tmp := filepath.Join(pr.volumesDir(), "."+v.Name+".tmp")
		_ = os.RemoveAll(tmp)
		if err := os.Mkdir(tmp, 0o755); err != nil {
			return err
		}
		if err := writeVolumeFiles(tmp, files); err != nil {
			return fmt.Errorf("volume %q: %w", v.Name, err)
		}
		if err := os.Rename(tmp, final); err != nil {
			return err
		}
	}
	return nil
}

// awaitVolumes prepares the volumes, retrying while that fails (the
// containers wait in ContainerCreating, the message says why). False
// means the pod is stopping.
func (pr *podRuntime) awaitVolumes() bool {
	return pr.retryUntilDone(pr.prepareVolumes, &pr.volumeErr, "volumes")
}

// apiDataVolume reports volumes the kubelet always mounts read-only.
func apiDataVolume(v *corev1.Volume) bool {
	return v.Secret != nil || v.ConfigMap != nil || v.DownwardAPI != nil || v.Projected != nil
}

// containerMounts lists the bind mounts of container c, parents first.
func (pr *podRuntime) containerMounts(c *corev1.Container) ([]bindMount, error) {
	pr.mu.Lock()
	p := pr.pod
	pr.mu.Unlock()
	vols := map[string]*corev1.Volume{}
	for i := range p.Spec.Volumes {
		vols[p.Spec.Volumes[i].Name] = &p.Spec.Volumes[i]
	}
	mounts := []bindMount{pr.hostsMount()}
	for _, vm := range c.VolumeMounts {
		v, ok := vols[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %q: no such volume", vm.Name)
		}
		src := filepath.Join(pr.volumesDir(), vm.Name)
		if vm.SubPath != "" {
			sub := filepath.Clean(vm.SubPath)
			if filepath.IsAbs(sub) || sub == ".." || strings.HasPrefix(sub, "../") {
				return nil, fmt.Errorf("volumeMount %q: subPath %q leaves the volume", vm.Name, vm.SubPath)
			}
			src = filepath.Join(src, sub)
		}
		mounts = append(mounts, bindMount{Source: src, Target: vm.MountPath, ReadOnly: vm.ReadOnly || apiDataVolume(v)})
	}
	sort.SliceStable(mounts, func(i, j int) bool {
		return strings.Count(filepath.Clean(mounts[i].Target), "/") < strings.Count(filepath.Clean(mounts[j].Target), "/")
	})
	return append(mounts, hiddenImageDirs(mounts, filepath.SplitList(os.Getenv(imageDirsEnv)))...), nil
}

// imageDirsEnv names the node's directories that stand for the containers' image: the checkout and
// venv whose console scripts the containers run (set by the test fixture). Images are ignored here,
// so a volume mounted over one of them (an emptyDir at /tmp, with the checkout under /tmp) would hide
// the container's own command, which a real image never does.
const imageDirsEnv = "DEVCLUSTER_IMAGE_DIRS"

// hiddenImageDirs binds each image directory that a mount would hide back at its place, read-only,
// after the volume mounts.
func hiddenImageDirs(mounts []bindMount, dirs []string) []bindMount {
	var again []bindMount
	for _, dir := range dirs {
		if dir == "" || !filepath.IsAbs(dir) {
			continue
		}
		for _, m := range mounts {
			rel, err := filepath.Rel(filepath.Clean(m.Target), filepath.Clean(dir))
			if err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
				again = append(again, bindMount{Source: dir, Target: dir, ReadOnly: true})
				break
			}
		}
	}
	return again
}
