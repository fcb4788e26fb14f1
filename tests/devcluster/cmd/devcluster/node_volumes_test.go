package main

import (
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
)

func TestKeyFilesItemsAndModes(t *testing.T) {
	data := map[string][]byte{"a": []byte("1"), "b": []byte("2")}
	files, err := keyFiles("secret", "s", data, []corev1.KeyToPath{{Key: "a", Path: "dir/a", Mode: ptr.To(int32(0o400))}}, nil, ptr.To(int32(0o640)))
	if err != nil || len(files) != 1 || files[0].path != "dir/a" || files[0].mode != 0o400 {
		t.Fatalf("items: %+v %v", files, err)
	}
	if _, err := keyFiles("secret", "s", data, []corev1.KeyToPath{{Key: "missing", Path: "x"}}, nil, nil); err == nil {
		t.Fatal("a missing item key must be an error")
	}
	files, err = keyFiles("secret", "s", data, []corev1.KeyToPath{{Key: "missing", Path: "x"}}, ptr.To(true), nil)
	if err != nil || len(files) != 0 {
		t.Fatalf("optional missing key: %+v %v", files, err)
	}
	files, _ = keyFiles("configmap", "c", data, nil, nil, nil)
	if len(files) != 2 || files[0].mode != 0o644 {
		t.Fatalf("all keys: %+v", files)
	}
}

func TestWriteVolumeFilesRefusesEscapingPaths(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"../x", "/etc/x", "a/../../x", ".."} {
		if err := writeVolumeFiles(dir, []volumeFile{{path: p, data: []byte("x"), mode: 0o644}}); err == nil {
			t.Errorf("path %q was accepted", p)
		}
	}
	if err := writeVolumeFiles(dir, []volumeFile{{path: "a/b", data: []byte("x"), mode: 0o600}}); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, "a/b"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("a/b: %v %v", st, err)
	}
}

func TestProbeThresholds(t *testing.T) {
	th := probeThresholds{success: 2, failure: 3}
	state := false
	for i, want := range []bool{false, true} {
		ok, changed := th.observe(true, state)
		if changed != want {
			t.Fatalf("success %d: changed=%v", i, changed)
		}
		state = ok
	}
	if !state {
		t.Fatal("two successes must make it ready")
	}
	for i, want := range []bool{false, false, true} {
		ok, changed := th.observe(false, state)
		if changed != want {
			t.Fatalf("failure %d: changed=%v", i, changed)
		}
		state = ok
	}
	if state {
		t.Fatal("three failures must make it unready")
	}
}

func TestKubernetesServiceEnv(t *testing.T) {
	host, port, err := apiserverHostPort("https://127.0.0.1:6443")
	if err != nil || host != "127.0.0.1" || port != "6443" {
		t.Fatalf("%q %q %v", host, port, err)
	}
	env := newOrderedEnv()
	setKubernetesServiceEnv(env, host, port)
	if env.m["KUBERNETES_SERVICE_HOST"] != "127.0.0.1" || env.m["KUBERNETES_SERVICE_PORT"] != "6443" {
		t.Fatalf("%v", env.m)
	}
	if _, _, err := apiserverHostPort("not a url"); err == nil {
		t.Fatal("want an error")
	}
}

func TestHiddenImageDirsAreBoundAgainReadOnly(t *testing.T) {
	mounts := []bindMount{{Source: "/pods/p/volumes/tmp", Target: "/tmp"}, {Source: "/pods/p/volumes/d", Target: "/data"}}
	got := hiddenImageDirs(mounts, []string{"/tmp/checkout", "/work/other", "/tmpfoo/x", "relative", ""})
	want := []bindMount{{Source: "/tmp/checkout", Target: "/tmp/checkout", ReadOnly: true}}
	if len(got) != len(want) || got[0] != want[0] {
		t.Fatalf("hiddenImageDirs = %+v, want %+v", got, want)
	}
	if again := hiddenImageDirs(mounts, []string{"/tmp"}); len(again) != 1 {
		t.Fatalf("a mount at the image dir itself hides it too: %+v", again)
	}
}
