package procid

import (
	"bufio"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestAliveCountsThreadsOfExitedLeader: a process whose main thread ended alone
// (exit(2), not exit_group(2)) says State Z while its other threads run on. Alive took
// it for ended, so Signal refused it (ESRCH: the native nexlet's stop sent no SIGTERM),
// and its process group, Members listing no live process in it, was taken for ended
// for good (a stop's kill of it then sent nothing). Now it runs until its threads end:
// Alive, listed, and signalled through its pidfd, which ends every thread.
func TestAliveCountsThreadsOfExitedLeader(t *testing.T) {
	cmd := testkit.LeaderExitCommand()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	defer func() { _ = cmd.Process.Kill(); <-waited }()
	id, err := Of(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	pg := NewPgrp(id)
	testkit.LeaderExited(t, id.PID, bufio.NewReader(out))
	st, err := ReadStat(id.PID)
	if err != nil {
		t.Fatal(err)
	}
	members, _ := pg.Members()
	t.Logf("main thread ended alone: State %c, Threads %d, Runs %v, Alive %v, LeaderRuns %v, group members %v",
		st.State, st.Threads, st.Runs(), id.Alive(), pg.LeaderRuns(), members)
	if st.State != 'Z' || st.Threads < 2 {
		t.Fatalf("stat says State %c, Threads %d: not a zombie main thread with threads running", st.State, st.Threads)
	}
	if !st.Runs() || !id.Alive() || !pg.LeaderRuns() {
		t.Errorf("a process whose threads run is taken for ended (Runs %v, Alive %v, LeaderRuns %v)", st.Runs(), id.Alive(), pg.LeaderRuns())
	}
	if len(members) != 1 || members[0] != id.PID || pg.Gone() {
		t.Errorf("its group lists %v (gone %v), want its process %d", members, pg.Gone(), id.PID)
	}
	if err := Signal(id, syscall.SIGKILL); err != nil {
		t.Errorf("Signal: %v", err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatalf("its threads (Threads: %s) still run 5 s after Signal's SIGKILL", testkit.StatusField(id.PID, "Threads"))
	}
	if id.Alive() {
		t.Error("Alive after its reap")
	}
}
