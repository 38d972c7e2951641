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
