package daemon

import (
	"os"
	"os/exec"
	"testing"
)

// TestWarmPidfdLeavesNothing: the warm-up of os's pidfd check (moved off the native
// nexlet's fork, which READY waits for) leaves no descriptor open, however often it
// runs, and a start after it still gets a working process (started, waited for, its
// status read), which is what the check decides.
func TestWarmPidfdLeavesNothing(t *testing.T) {
	fds := func() int {
		t.Helper()
		es, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(es)
	}
	before := fds()
	warmPidfd()
	warmPidfd()
	if after := fds(); after != before {
		t.Fatalf("descriptors open: %d before the warm-up, %d after", before, after)
	}
	cmd := exec.Command("/bin/sh", "-c", "exit 3")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil || cmd.ProcessState.ExitCode() != 3 {
		t.Fatalf("start after the warm-up: err %v, status %v; want exit status 3", err, cmd.ProcessState)
	}
	if after := fds(); after != before {
		t.Fatalf("descriptors open: %d before, %d after a start and its wait", before, after)
	}
}
