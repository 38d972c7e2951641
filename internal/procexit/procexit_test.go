package procexit

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestOrphanExitStatus: a grandchild whose parent exited first (so it is reparented,
// and its status goes to init, not to us) exits with 9 or is killed by SIGTERM; the
// listener reports both statuses.
func TestOrphanExitStatus(t *testing.T) {
	l, err := Listen()
	if err != nil {
		t.Skipf("process events unavailable here (root in the initial namespaces needed): %v", err)
	}
	done := make(chan struct{})
	exits := make(chan Exit, 1024)
	go func() {
		defer close(done)
		for {
			e, err := l.Next()
			if errors.Is(err, ErrLost) {
				continue
			}
			if err != nil {
				return
			}
			exits <- e
		}
	}()
	out, err := exec.Command("/bin/sh", "-c", `(sleep 0.5; exit 9) >/dev/null 2>&1 & echo $!; sleep 30 >/dev/null 2>&1 & echo $!`).Output()
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(out))
	coded, _ := strconv.Atoi(f[0])
	killed, _ := strconv.Atoi(f[1])
	if coded == 0 || killed == 0 {
		t.Fatalf("no grandchild pids in %q", out)
	}
	if err := syscall.Kill(killed, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	want := map[int]func(syscall.WaitStatus) bool{
		coded:  func(ws syscall.WaitStatus) bool { return ws.Exited() && ws.ExitStatus() == 9 },
		killed: func(ws syscall.WaitStatus) bool { return ws.Signaled() && ws.Signal() == syscall.SIGTERM },
	}
	timeout := time.After(10 * time.Second)
	for len(want) > 0 {
		select {
		case e := <-exits:
			if ok, found := want[e.PID]; found {
				if !ok(e.Status) {
					t.Fatalf("pid %d ended with status %#x", e.PID, uint32(e.Status))
				}
				if e.Parent == os.Getpid() {
					t.Fatalf("pid %d was our child: the test needs an orphan", e.PID)
				}
				delete(want, e.PID)
			}
		case <-timeout:
			t.Fatalf("exits of %v not reported", want)
		}
	}
	l.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end Next")
	}
}
