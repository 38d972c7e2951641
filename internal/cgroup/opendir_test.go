package cgroup

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestOpenDirReal: a group opened on a cgroup directory someone else made (as systemd
// makes a workload's scope) lists the process placed there, counts no OOM kill, kills
// it, and reads nothing but an empty list once the directory is gone. Real cgroup2
// (the unified hierarchy of this hybrid host); skipped where it is not writable.
func TestOpenDirReal(t *testing.T) {
	root := "/sys/fs/cgroup/unified"
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC || unix.Access(root, unix.W_OK) != nil {
		t.Skip("no writable cgroup2 mount at " + root)
	}
	dir := filepath.Join(root, testkit.OwnedName(t, "nexd-test-opendir-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skip(err)
	}
	t.Cleanup(func() { _ = unix.Rmdir(dir) })

	g := OpenDir(filepath.Join(dir, "missing.scope"), nil)
	if g.m.Mode() != ModeV2 {
		t.Fatalf("mode %s for a directory on cgroup2, want v2", g.m.Mode())
	}
	if ps, err := g.Procs(); err != nil || len(ps) != 0 {
		t.Errorf("missing directory: procs %v, %v; want none", ps, err)
	}

	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() { _ = cmd.Wait(); close(reaped) }() // reaped, so the group can empty
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-reaped })
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	g = OpenDir(dir, nil)
	ps, err := g.Procs()
	if err != nil || !slices.Equal(ps, []int{cmd.Process.Pid}) {
		t.Fatalf("procs %v, %v; want [%d]", ps, err, cmd.Process.Pid)
	}
	if n, err := g.OOMKills(); err != nil || n != 0 {
		t.Errorf("oom kills %d, %v; want 0", n, err)
	}
	if err := g.Kill(); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if ps, _ := g.Procs(); len(ps) != 0 {
		t.Errorf("after kill: procs %v", ps)
	}
}
