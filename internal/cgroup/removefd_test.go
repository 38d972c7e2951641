package cgroup

import (
	"bufio"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestRemovePastKillDeadlineHoldsNoPidfd: a group whose process ran outside any cgroup
// (none mode here; a failed move in the others) reaches it through its process group,
// tracked by its leader's pidfd (procid.Pgrp). A member of that group outlives
// SIGKILL (frozen: in D state until thawed, as on a hung mount), so Remove's kill fails
// at its deadline. Remove kept the pidfd then, for a retry no caller makes: the native
// nexlet's sandbox removal, the supervisor's removal of a nexlet's group and a nexlet's
// failed start each drop the group after one Remove, and the pidfd stayed open until a
// garbage collection, never with GOGC=off. Now Remove lets go of it either way.
func TestRemovePastKillDeadlineHoldsNoPidfd(t *testing.T) {
	if err := procid.GroupSignals(); err != nil {
		t.Skipf("process groups reached by number here (no pidfd held): %v", err)
	}
	m := Disabled("no cgroups in this test", testLogger(t))
	g, err := m.Create("w", Limits{})
	must(t, err)
	// No collection meanwhile: a dropped *os.File's finalizer would close it.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := testkit.Pidfds()
	run := exec.Command("/bin/sh", "-c", "sleep 600 & echo $!; exec sleep 600")
	out, err := run.StdoutPipe()
	must(t, err)
	must(t, g.Start(run))
	waited := false
	defer func() {
		if !waited {
			_ = run.Process.Kill()
			_ = run.Wait()
		}
	}()
	line, err := bufio.NewReader(out).ReadString('\n')
	must(t, err)
	member, err := strconv.Atoi(strings.TrimSpace(line))
	must(t, err)
	thaw := testkit.FreezeV1(t, member)
	if err := g.Remove(); err == nil {
		t.Fatal("Remove of a group whose member survives SIGKILL succeeded")
	} else {
		t.Logf("Remove: %v", err)
		// Before, none mode's error named no group: "cgroup : processes [...] survive SIGKILL".
		if !strings.HasPrefix(err.Error(), "cgroup /w (none mode") {
			t.Errorf("Remove's error %q does not name the group", err)
		}
	}
	// The leader died of the kill; its reap lets go of exec.Cmd's own pidfd.
	_ = run.Wait()
	waited = true
	held := testkit.Pidfds() - before
	thaw()
	testkit.Eventually(t, "the thawed member killed", func() bool { return !alive(member) })
	if held != 0 {
		t.Errorf("a Remove whose kill failed left %d pidfds open (the group dropped after it, as every caller does), want 0", held)
	}
}
