package bench

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// standInUpstream writes a script startUpstream runs in place of upstream's nex (its
// arguments ignored): it logs the ready line and runs body.
func standInUpstream(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "nex")
	testkit.WriteFile(t, path, "#!/bin/sh\necho "+upstreamReadyLog+"\n"+body+"\n")
	if err := os.Chmod(path, 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestUpstreamStopSparesRecycledNumbers: the upstream node ended by itself and was
// reaped before its stop; its pid, and with it its process group's number, went to a
// stranger's group leader with a child. stop killed by the numbers: kill(-pid) took
// the stranger's group, and the node's children listed by its pid the stranger's
// child: 2 of 2 killed. Now the group goes through the node's pidfd (ended: ESRCH) and
// a child only while the pid is still the node's: none.
func TestUpstreamStopSparesRecycledNumbers(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	u, err := startUpstream(standInUpstream(t, "exit 0"), t.TempDir(), "stand-in", "nats://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	<-u.exited
	n := u.Pid()
	child := testkit.StrangerGroupAt(t, n)
	if err := u.stop(time.Second); err != nil {
		t.Fatal(err)
	}
	if killed := testkit.KilledOf(n, child); killed != 0 {
		t.Fatalf("the stop of the ended upstream node killed %d of 2 processes of a stranger's group given its pid %d", killed, n)
	}
}

// TestUpstreamStopKillsWhatItLeft: stop's SIGINT ends the node, which leaves a process
// in its group and a workload in a group of its own: both are killed, the first
// through the group of the reaped node (its pidfd), the second pinned while it was
// the node's child.
func TestUpstreamStopKillsWhatItLeft(t *testing.T) {
	dir := t.TempDir()
	bin := standInUpstream(t, `sleep 3600 & echo $! > `+dir+`/member
setsid sleep 3600 & echo $! > `+dir+`/workload
trap 'exit 0' INT
while :; do sleep 1; done`)
	u, err := startUpstream(bin, t.TempDir(), "stand-in", "nats://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.waitReady(t.Context(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	var left [2]int
	for i, name := range []string{"member", "workload"} {
		testkit.EventuallyWithin(t, 5*time.Second, name+"'s pid written", func() bool {
			b, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				return false
			}
			left[i], err = strconv.Atoi(strings.TrimSpace(string(b)))
			return err == nil
		})
		t.Cleanup(func() { _ = syscall.Kill(left[i], syscall.SIGKILL) })
	}
	if err := u.stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"member", "workload"} {
		testkit.EventuallyWithin(t, 5*time.Second, "the node's "+name+" killed", func() bool { return !testkit.Running(left[i]) })
	}
}
