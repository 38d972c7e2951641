package testkit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// envPidns names the test a copy of the test binary runs inside its pid namespace.
const envPidns = "NEXD_TESTKIT_PIDNS"

// InPidNamespace runs the calling test again in a copy of the test binary inside a pid
// namespace (and mount namespace, with its own /proc) of its own, where a test may give
// a new process a pid of its choosing (StartAtPid) to reuse a number, with nothing of
// the host's at risk: the copy is the namespace's init, and everything in it dies with
// it. It returns true in the copy, which runs the test's body; outside, it waits for the
// copy (bounded), fails t with the copy's output unless the test passed there, and
// returns false. Root only: it skips t otherwise.
func InPidNamespace(t *testing.T) bool {
	t.Helper()
	if os.Getenv(envPidns) == t.Name() {
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a pid namespace of its own")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare (util-linux) not installed: no pid namespace for the test")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(t.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, unshare, "--pid", "--fork", "--mount-proc", "--kill-child",
		exe, "-test.run="+strings.Join(parts, "/"), "-test.count=1", "-test.v", "-test.timeout=90s")
	cmd.Env = append(os.Environ(), envPidns+"="+t.Name())
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: "+t.Name()+" ") {
		t.Fatalf("in a pid namespace of its own: %v\n%s", err, out)
	}
	return false
}

// StartAtPid starts cmd as the process with pid in the test's pid namespace
// (InPidNamespace's copy only): ns_last_pid set to the number before it makes the
// kernel hand out pid next, unless another fork takes it first, which fails t. It
// starts in a later clock tick than the processes before it: start times, which tell a
// process from an earlier one with its pid, count 10 ms ticks, and on a host a number
// comes round again only after all the others were handed out, never within a tick.
// The process is killed and waited for when t ends.
func StartAtPid(t testing.TB, pid int, cmd *exec.Cmd) {
	t.Helper()
	if os.Getenv(envPidns) == "" {
		t.Fatal("StartAtPid outside InPidNamespace would reuse a pid of the host")
	}
	time.Sleep(20 * time.Millisecond)
	if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0); err != nil {
		t.Fatalf("ns_last_pid: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if cmd.Process.Pid != pid {
		t.Fatalf("started as pid %d, not the %d asked for (another fork came first)", cmd.Process.Pid, pid)
	}
}

// StrangerGroupAt starts, as pid of the test's pid namespace (StartAtPid), a process
// group leader with a child in its group: a stranger's group with the number of an
// ended one. It returns the child's pid; both are killed when t ends.
func StrangerGroupAt(t testing.TB, pid int) (child int) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", "sleep 3600 & echo $!; wait")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	StartAtPid(t, pid, cmd)
	if _, err := fmt.Fscan(out, &child); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(child, syscall.SIGKILL) })
	return child
}
