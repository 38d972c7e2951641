package procid

import (
	"errors"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestSignalSparesReusedPid: a process that ended, whose pid went to a stranger, is not
// signalled by its identity; a SIGTERM by the bare pid (what a stop sent the main
// process of a workload, also one adopted after a nexlet restart) ended the stranger.
func TestSignalSparesReusedPid(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	run := exec.Command("/bin/sleep", "3600")
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	id, err := Of(run.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := Signal(id, unix.Signal(0)); err != nil {
		t.Fatalf("signal 0 to the running process: %v", err)
	}
	_ = run.Process.Kill()
	_ = run.Wait()
	stranger := exec.Command("/bin/sleep", "3600")
	testkit.StartAtPid(t, id.PID, stranger)
	if err := Signal(id, unix.SIGTERM); !errors.Is(err, unix.ESRCH) {
		t.Fatalf("Signal to the ended process = %v, want ESRCH", err)
	}
	// The stranger is still running a while later (a SIGTERM would end sleep at once).
	time.Sleep(100 * time.Millisecond)
	var ws unix.WaitStatus
	if pid, err := unix.Wait4(stranger.Process.Pid, &ws, unix.WNOHANG, nil); pid != 0 || err != nil {
		t.Fatalf("the stranger with the ended process's pid %d ended: %v %v", id.PID, ws, err)
	}
	_ = syscall.Kill(stranger.Process.Pid, syscall.SIGKILL)
}

// TestPinSparesRecycledPid: a listed pid is pinned (Pin), and its process ends, its
// number going to a stranger, after the caller's check said to signal it (keep) and
// before the signal: the stranger runs on, with a pidfd (the signal reaches the pinned
// process, reaped: ESRCH) and without (the start time read at the pin differs from the
// stranger's). A pinned process that still runs is signalled both ways.
func TestPinSparesRecycledPid(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	for _, pidfds := range []bool{true, false} {
		listed := exec.Command("/bin/sleep", "3600")
		if err := listed.Start(); err != nil {
			t.Fatal(err)
		}
		n := listed.Process.Pid
		p := pin([]int{n}, pidfds)
		stranger := exec.Command("/bin/sleep", "3600")
		sent, err := p.Signal(unix.SIGKILL, func(pid int) bool {
			// The check saw the listed process; it ends, and its number is reused.
			_ = listed.Process.Kill()
			_ = listed.Wait()
			testkit.StartAtPid(t, pid, stranger)
			return true
		})
		p.Close()
		if len(sent) != 0 || err != nil {
			t.Errorf("pidfds %v: Signal sent to %v (%v); want none", pidfds, sent, err)
		}
		time.Sleep(50 * time.Millisecond)
		var ws unix.WaitStatus
		if pid, err := unix.Wait4(n, &ws, unix.WNOHANG, nil); pid != 0 || err != nil {
			t.Fatalf("pidfds %v: the stranger with the listed process's pid %d ended: %v %v", pidfds, n, ws, err)
		}
		// The stranger, pinned itself, is signalled.
		p = pin([]int{n}, pidfds)
		sent, err = p.Signal(unix.SIGKILL, func(int) bool { return true })
		p.Close()
		if len(sent) != 1 || err != nil {
			t.Fatalf("pidfds %v: Signal to a running pinned process sent to %v (%v)", pidfds, sent, err)
		}
		if err := stranger.Wait(); err == nil {
			t.Fatalf("pidfds %v: the pinned process was not killed", pidfds)
		}
	}
}
