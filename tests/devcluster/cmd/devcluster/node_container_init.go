package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// Go's os/exec cannot run code between fork and exec, so a container with
// volume mounts is started as `devcluster container-init MOUNTS PATH ARGV...`
// in a new mount namespace (SysProcAttr.Unshareflags); container-init
// bind-mounts the pod's volume directories and then execs the container's
// command, which keeps the pid, process group and parent-death signal.

// bindMount is one volume mount of a container.
type bindMount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly"`
}

// containerInitCommand wraps path/argv into container-init when there are
// mounts; unshare must then be set on the command (see withMountNamespace).
func containerInitCommand(mounts []bindMount, path string, argv []string) (string, []string, error) {
	if len(mounts) == 0 {
		return path, argv, nil
	}
	self, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	spec, err := json.Marshal(mounts)
	if err != nil {
		return "", nil, err
	}
	return self, append([]string{"devcluster", "container-init", string(spec), path}, argv...), nil
}

// withMountNamespace gives a wrapped command its own mount namespace.
func withMountNamespace(attr *syscall.SysProcAttr, wrapped bool) *syscall.SysProcAttr {
	if wrapped {
		attr.Unshareflags |= syscall.CLONE_NEWNS
	}
	return attr
}

func runContainerInit(args []string) int {
	if len(args) < 3 {
		fmt.Fprintln(os.Stderr, "container-init: usage: container-init MOUNTS-JSON PATH ARGV0 [ARGS...]")
		return 2
	}
	var mounts []bindMount
	if err := json.Unmarshal([]byte(args[0]), &mounts); err != nil {
		fmt.Fprintf(os.Stderr, "container-init: bad mounts: %v\n", err)
		return 2
	}
	// Go already makes / private after the unshare; repeat it so no mount
	// can propagate back to the node even if that changes.
	if err := syscall.Mount("none", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		fmt.Fprintf(os.Stderr, "container-init: make mounts private: %v\n", err)
		return 1
	}
	// Every source is opened before the first mount: a mount at a parent
	// of the pods directory (an emptyDir at /tmp while the state dir is in
	// /tmp) would otherwise hide the sources of the mounts after it.
	sources := make([]openSource, len(mounts))
	for i, m := range mounts {
		src, err := openMountSource(m.Source)
		if err != nil {
			fmt.Fprintf(os.Stderr, "container-init: mount %s at %s: %v\n", m.Source, m.Target, err)
			return 1
		}
		sources[i] = src
	}
	for i, m := range mounts {
		if err := bind(m, sources[i]); err != nil {
			fmt.Fprintf(os.Stderr, "container-init: mount %s at %s: %v\n", m.Source, m.Target, err)
			return 1
		}
		syscall.Close(sources[i].fd)
	}
	path, argv := args[1], args[2:]
	err := syscall.Exec(path, argv, os.Environ())
	fmt.Fprintf(os.Stderr, "container-init: exec %s: %v\n", path, err)
	if os.IsNotExist(err) {
		return 127
	}
	return 126
}

// openSource is a mount source held open, mounted through /proc/self/fd.
type openSource struct {
	fd    int
	isDir bool
}

func openMountSource(path string) (openSource, error) {
	st, err := os.Stat(path)
	if err != nil {
		return openSource{}, err
	}
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return openSource{}, err
	}
	return openSource{fd: fd, isDir: st.IsDir()}, nil
}

func bind(m bindMount, src openSource) error {
	// The mount point must exist; creating it changes the node's file
	// system (an empty directory or file), as a container runtime would in the image.
	if src.isDir {
		if err := os.MkdirAll(m.Target, 0o755); err != nil {
			return err
		}
	} else if _, err := os.Stat(m.Target); os.IsNotExist(err) {
		if err := os.MkdirAll(filepath.Dir(m.Target), 0o755); err != nil {
			return err
		}
		f, err := os.OpenFile(m.Target, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	if err := syscall.Mount(fmt.Sprintf("/proc/self/fd/%d", src.fd), m.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return err
	}
	if m.ReadOnly {
		return syscall.Mount("", m.Target, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY|syscall.MS_REC, "")
	}
	return nil
}
