package procexit

import (
	"errors"
	"os"
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
