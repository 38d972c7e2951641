package cgroup

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReleaseForRestart on a plain directory tree standing in for cgroupfs: every
// cgroup.subtree_control that enables controllers gets them disabled, children first
// (the kernel refuses to disable a controller a child still enables).
func TestReleaseForRestart(t *testing.T) {
	root := t.TempDir()
	write := func(rel, v string) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("cgroup.subtree_control", "memory pids cpu\n")
	write("workloads/cgroup.subtree_control", "memory pids\n")
	write("workloads/abc/cgroup.subtree_control", "")
	write("supervisor/cgroup.subtree_control", "")
	n, err := ReleaseForRestart(root)
	if err != nil || n != 2 {
		t.Fatalf("ReleaseForRestart = %d, %v; want 2 changed", n, err)
	}
	for rel, want := range map[string]string{"cgroup.subtree_control": "-memory -pids -cpu",
		"workloads/cgroup.subtree_control": "-memory -pids", "workloads/abc/cgroup.subtree_control": ""} {
		if b, _ := os.ReadFile(filepath.Join(root, rel)); string(b) != want {
			t.Errorf("%s = %q, want %q", rel, b, want)
		}
	}
	if n, err := ReleaseForRestart(filepath.Join(root, "missing")); n != 0 || err != nil {
		t.Errorf("missing dir: %d, %v", n, err)
	}
}
