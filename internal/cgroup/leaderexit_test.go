package cgroup

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestKillReachesThreadsOfExitedLeader: a process whose main thread ended alone
// (exit(2)) says State Z while its other threads run on in the group, and cgroup.procs
// lists it. Procs and Kill took every State Z for a process that had ended: Procs
// listed none, Kill sent nothing and returned as if the group were empty, and such a
// workload (one that ignores SIGTERM too) ran on past its stop in its v1 group (before:
// Procs [], Kill nil, Threads 7 after). Now it is listed and SIGKILLed like any other.
func TestKillReachesThreadsOfExitedLeader(t *testing.T) {
	m := v1Root(t)
	g, err := m.Create("w", Limits{})
	must(t, err)
	cmd := testkit.LeaderExitCommand()
	out, err := cmd.StdoutPipe()
	must(t, err)
	must(t, g.Start(cmd))
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	defer func() { _ = cmd.Process.Kill(); <-waited }()
	pid := cmd.Process.Pid
	testkit.LeaderExited(t, pid, bufio.NewReader(out))
	pids, err := g.Procs()
	must(t, err)
	kerr := g.Kill()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
	}
	threads := testkit.StatusField(pid, "Threads")
	t.Logf("group with a process whose main thread exited alone: Procs %v, Kill %v, its threads after %q", pids, kerr, threads)
	if len(pids) != 1 || pids[0] != pid {
		t.Errorf("Procs listed %v, want its process %d, whose threads run", pids, pid)
	}
	if threads != "" {
		t.Errorf("the process's threads (Threads: %s) still run after the group's Kill", threads)
	}
}

// TestProcsFindsThreadsMovedAfterLeaderExit (cgroup v2): a process whose main thread
// ended alone in one group and which was then moved to another (its pid written to
// cgroup.procs, as systemd places a workload from its holding group into its scope) has
// its running threads in the new group and its ended main thread in the old one. v2's
// cgroup.procs lists a process where its main thread is: the new group's is empty, and
// cgroup.kill passes over the process too. The new group's Procs listed nothing and its
// Kill sent nothing (before: Procs [], Kill nil, Threads 7 after), so the systemd
// driver's stop took the workload's scope for empty while its threads ran on. Now Procs
// finds it by its threads (cgroup.threads) and Kill kills it; the old group has no
// thread left (Threads). v1 lists a process wherever a thread of it is: not affected.
// The real unified hierarchy of this hybrid host; skipped without one.
func TestProcsFindsThreadsMovedAfterLeaderExit(t *testing.T) {
	const unified = "/sys/fs/cgroup/unified"
	var fs unix.Statfs_t
	if err := unix.Statfs(unified, &fs); err != nil || fs.Type != unix.CGROUP2_SUPER_MAGIC || !writable(filepath.Join(unified, "cgroup.procs")) {
		t.Skipf("no writable cgroup2 mount at %s on this machine", unified)
	}
	root := filepath.Join(unified, testkit.OwnedName(t, "nexd-test-"))
	m, err := Detect(root, testLogger(t))
	must(t, err)
	t.Cleanup(func() { _ = m.group("").Remove() })
	hold, err := m.Create("hold", Limits{})
	must(t, err)
	dst, err := m.Create("dst", Limits{})
	must(t, err)
	cmd := testkit.LeaderExitCommand()
	out, err := cmd.StdoutPipe()
	must(t, err)
	must(t, hold.Start(cmd))
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	defer func() { _ = cmd.Process.Kill(); <-waited }()
	pid := cmd.Process.Pid
	testkit.LeaderExited(t, pid, bufio.NewReader(out))
	must(t, os.WriteFile(filepath.Join(dst.Path(), "cgroup.procs"), []byte(strconv.Itoa(pid)), 0))
	if ts, err := hold.Threads(); err != nil || len(ts) != 0 {
		t.Errorf("the old group's threads after the move: %v %v, want none", ts, err)
	}
	if ts, err := dst.Threads(); err != nil || len(ts) == 0 {
		t.Errorf("the new group's threads after the move: %v %v, want the process's", ts, err)
	}
	pids, err := dst.Procs()
	must(t, err)
	kerr := dst.Kill()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
	}
	threads := testkit.StatusField(pid, "Threads")
	t.Logf("moved after its main thread ended: the new group's cgroup.procs %q, Procs %v, Kill %v, its threads after %q",
		readTrimOr(filepath.Join(dst.Path(), "cgroup.procs")), pids, kerr, threads)
	if len(pids) != 1 || pids[0] != pid {
		t.Errorf("Procs of the group its threads run in listed %v, want %d", pids, pid)
	}
	if threads != "" {
		t.Errorf("the process's threads (Threads: %s) still run after the group's Kill", threads)
	}
}

func readTrimOr(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return err.Error()
	}
	return strings.TrimSpace(string(b))
}
