package cgroup

import (
	"bufio"
	"testing"
	"time"

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
