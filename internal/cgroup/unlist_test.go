package cgroup

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestAttackOtherUIDListsWorkloadGroups: a workload's cgroup is named for its id, in a
// directory nexd made with mkdir's 0755 less its umask. Under umask 022 (nexd started by
// hand) any other uid (a workload, a local user) listed it and read every tenant's
// workload ids; the control listing below, before Unlist, shows it. After Unlist the
// listing is refused, and the uid still reaches a group whose name it knows (a
// workload reading its own limits).
func TestAttackOtherUIDListsWorkloadGroups(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: real cgroups and another uid")
	}
	m := v1Root(t)
	wl, err := m.Create("workloads", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	const id = "Vict1mWorkloadId0000000"
	if _, err := m.Create("workloads/"+id, Limits{MemoryMax: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	uid := testkit.UIDs(t, 1)
	as := func(script string) (string, error) {
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	dir := m.hierDir("memory")
	parent := filepath.Join(dir, "workloads")
	own := filepath.Join(parent, id, "memory.limit_in_bytes")

	// Control: the directory as mkdir under umask 022 makes it (this process's umask
	// may differ).
	if err := os.Chmod(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := as("ls " + parent); err != nil || !strings.Contains(out, id) {
		t.Fatalf("control: uid %d listing %s: %q %v, want the workload's id", uid, parent, out, err)
	}

	if err := wl.Unlist(); err != nil {
		t.Fatal(err)
	}
	for _, h := range wl.hiers {
		if fi, err := os.Stat(h.Root); err != nil || fi.Mode().Perm() != UnlistedMode {
			t.Errorf("%s: mode %v, want %o: %v", h.Root, fi.Mode().Perm(), UnlistedMode, err)
		}
	}
	if out, err := as("ls " + parent); err == nil || strings.Contains(out, id) {
		t.Errorf("uid %d listed %s after Unlist: %q", uid, parent, out)
	}
	if out, err := as("cat " + own); err != nil || out != "67108864" {
		t.Errorf("uid %d reading %s by name: %q %v, want its limit", uid, own, out, err)
	}
}
