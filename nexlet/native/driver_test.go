package native

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/sdscope"
)

// TestCgroupDriverRefused: a nexlet told to use systemd scopes where systemd is not the
// init system refuses to start with the reason (it never falls back silently: the
// operator asked for scopes); an unknown driver names the choices.
func TestCgroupDriverRefused(t *testing.T) {
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		t.Skip("systemd is the init system here; make systemd-test covers the driver")
	}
	for driver, want := range map[string]string{
		DriverSystemd: "systemd is not the init system here",
		"runc":        `want cgroupfs or systemd`,
	} {
		base := ownWorkloadsBase(t)
		_, err := New(Config{RuntimeDir: t.TempDir(), CgroupDriver: driver, Users: UserPolicy{LeaseDir: t.TempDir()}, workloadsBase: base, asideRoots: ownAsideRoots(t),
			Logger: slog.New(slog.DiscardHandler)})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("driver %q: %v, want an error with %q", driver, err, want)
		}
		// Nothing of the refused nexlet stays in the workloads base (its directory,
		// empty, and the record beside it).
		if ents, _ := os.ReadDir(base); len(ents) != 0 {
			t.Errorf("driver %q: the refused nexlet left %d entries in %s (%s...)", driver, len(ents), base, ents[0].Name())
		}
	}
}

// TestCgroupfsFindsWorkloadInScope: after a switch from cgroup_driver systemd back to
// cgroupfs, a replayed workload still running in its scope is seen (so it is adopted,
// never started a second time) and killed there. The scope is a real cgroup2 directory
// at the place systemd would make it, with a real process; skipped where systemd is
// init (the directory is systemd's there) or no cgroup2 and v1 hierarchies are writable.
func TestCgroupfsFindsWorkloadInScope(t *testing.T) {
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		t.Skip("systemd is the init system here: nex-workloads.slice is its own")
	}
	spec := cgroupSpec(t)
	id := fmt.Sprintf("switch%d", rand.Int64N(1e9))
	dir := sdscope.CgroupDir(id)
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(filepath.Dir(filepath.Dir(dir))), &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Skip("no cgroup2 hierarchy for scopes here")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Skip(err)
	}
	t.Cleanup(func() {
		for d := dir; strings.Contains(d, ".slice"); d = filepath.Dir(d) {
			_ = unix.Rmdir(d) // only empty ones go; a real slice with scopes stays
		}
	})
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() { _ = cmd.Wait(); close(reaped) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-reaped })
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}

	n, err := New(Config{RuntimeDir: t.TempDir(), Cgroup: spec, Users: UserPolicy{LeaseDir: t.TempDir()}, workloadsBase: ownWorkloadsBase(t), asideRoots: ownAsideRoots(t), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	sb, err := n.iso.sandbox(id, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sb.remove() })
	if ps, err := sb.procs(); err != nil || !slices.Contains(ps, cmd.Process.Pid) {
		t.Fatalf("procs %v, %v: the workload in its scope (%d) is not seen", ps, err, cmd.Process.Pid)
	}
	if err := sb.kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-reaped:
	case <-time.After(10 * time.Second):
		t.Fatal("the workload in its scope survived the kill")
	}
	if ps, _ := sb.procs(); len(ps) != 0 {
		t.Errorf("after kill: %v", ps)
	}
}
