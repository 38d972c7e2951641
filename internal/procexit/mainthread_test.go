package procexit

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"testing"
	"time"
)

// onMain runs functions on the main thread: TestMain's goroutine, locked to it by init,
// serves them while the tests run on other goroutines.
var onMain = make(chan func())

func init() { runtime.LockOSThread() }

func TestMain(m *testing.M) {
	go func() { os.Exit(m.Run()) }()
	for f := range onMain {
		f()
	}
}

// TestProbeOnMainThread: the probe's thread-ending goroutine, run on the main thread
// (which the runtime never ends, it parks it), still ends a thread and its exit event
// arrives. Before, Listen found process events unavailable whenever the probe's
// goroutine happened to run on the main thread: the flaky "none arrived within 2s"
// of the orphan e2e tests on a loaded host.
func TestProbeOnMainThread(t *testing.T) {
	l, err := Listen()
	if err != nil {
		t.Skipf("process events unavailable here (root in the initial namespaces needed): %v", err)
	}
	defer l.Close()
	got := make(chan int, 1)
	onMain <- func() {
		tids := make(chan int, 1)
		exitThread(tids) // runs on the main thread, locked there
		got <- <-tids
	}
	tid := <-got
	if tid == os.Getpid() {
		t.Fatalf("the main thread %d was the one to end", tid)
	}
	if err := l.f.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	for {
		ex, _, err := l.next()
		if errors.Is(err, ErrLost) {
			continue
		}
		if err != nil {
			t.Fatalf("no exit event for thread %d: %v", tid, err)
		}
		if ex.PID == tid {
			return
		}
	}
}

// TestExitDuringProbeIsKept: an exit that happens while the probe waits for its own
// thread's is still returned by Next. Before, the probe dropped it: a workload that
// ended while a just-started nexd probed for process events lost its exit code.
func TestExitDuringProbeIsKept(t *testing.T) {
	l, err := Listen()
	if err != nil {
		t.Skipf("process events unavailable here (root in the initial namespaces needed): %v", err)
	}
	defer l.Close()
	cmd := exec.Command("/bin/sh", "-c", "exit 7")
	if err := cmd.Run(); err == nil {
		t.Fatal("sh -c 'exit 7' succeeded")
	}
	// Its exit event waits in the socket, ahead of the probe's thread's.
	if err := l.probe(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.f.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	for {
		ex, err := l.Next()
		if errors.Is(err, ErrLost) {
			continue
		}
		if err != nil {
			t.Fatalf("the exit of pid %d, which ended during the probe, never came: %v", cmd.Process.Pid, err)
		}
		if ex.PID == cmd.Process.Pid {
			if !ex.Status.Exited() || ex.Status.ExitStatus() != 7 {
				t.Fatalf("pid %d ended with status %#x, want exit 7", ex.PID, uint32(ex.Status))
			}
			return
		}
	}
}
