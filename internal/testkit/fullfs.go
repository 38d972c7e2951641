package testkit

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// SmallFS mounts a tmpfs of size (e.g. "160m") on a new temporary directory and returns
// it; the cleanup unmounts it. The test is skipped where mounting is not allowed (not
// root).
func SmallFS(t testing.TB, size string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "nexd-test-small", dir).CombinedOutput(); err != nil {
		t.Skipf("mount a tmpfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

// FillFS writes a file into dir until its file system is full (ENOSPC) and returns
// the file's path: removing it frees the space again.
func FillFS(t testing.TB, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "fill")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for err == nil {
		_, err = f.Write(buf)
	}
	f.Close()
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the file system of %s: %v", dir, err)
	}
	return path
}
