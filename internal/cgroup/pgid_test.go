package cgroup

import (
	"fmt"
	"log/slog"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestKillSparesRecycledProcessGroup: a group without cgroups (none mode) reaches its
// processes through their process group. Once the group's run ended (its leader killed
// and reaped, the group empty), the kernel hands the number out again; here a stranger's
// group leader and its child get it. Before, the group kept the number for ever, and
// its Kill (a stop, a restart, a tidy) SIGKILLed both strangers and Procs listed them:
// 2 processes of another owner killed. Now the group is known gone and nothing of the
// stranger is listed or killed.
func TestKillSparesRecycledProcessGroup(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	m := Disabled("no cgroups in this test", testLogger(t))
	g, err := m.Create("w", Limits{})
	must(t, err)
	run := exec.Command("/bin/sleep", "3600")
	must(t, g.Start(run))
	n := run.Process.Pid
	if pids, err := g.Procs(); err != nil || len(pids) != 1 || pids[0] != n {
		t.Fatalf("procs of the running group: %v, %v", pids, err)
	}
	_ = run.Process.Kill()
	_ = run.Wait()

	sl, sc := n, testkit.StrangerGroupAt(t, n)
	pids, err := g.Procs()
	must(t, err)
	must(t, g.Kill())
	killed := 0
	for _, p := range []int{sl, sc} {
		if !alive(p) {
			killed++
		}
	}
	if len(pids) != 0 || killed != 0 {
		t.Fatalf("the ended group listed %v and killed %d of 2 processes of a stranger's group with its old number %d", pids, killed, n)
	}
	must(t, g.Remove())
	if !alive(sl) || !alive(sc) {
		t.Fatal("Remove killed the stranger")
	}
}

// TestKillReachesLeftoversOfReapedLeader: what a run left in its process group is
// still killed after its leader was reaped, when the group noted its members while
// the leader waited to be reaped (NoteMembers): the group's number was never free.
func TestKillReachesLeftoversOfReapedLeader(t *testing.T) {
	m := Disabled("no cgroups in this test", testLogger(t))
	g, err := m.Create("w", Limits{})
	must(t, err)
	run := exec.Command("/bin/sh", "-c", "sleep 3600 & echo $!")
	out, err := run.StdoutPipe()
	must(t, err)
	must(t, g.Start(run))
	var left int
	if _, err := fmt.Fscan(out, &left); err != nil {
		t.Fatal(err)
	}
	var info unix.Siginfo // the leader exited, not reaped yet
	must(t, unix.Waitid(unix.P_PID, run.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil))
	g.NoteMembers()
	_ = run.Wait()
	pids, err := g.Procs()
	must(t, err)
	if len(pids) != 1 || pids[0] != left {
		t.Fatalf("procs after the leader's reap: %v, want the leftover %d", pids, left)
	}
	must(t, g.Kill())
	if alive(left) {
		t.Fatal("the leftover survived the group's Kill")
	}
	if pids, _ := g.Procs(); len(pids) != 0 {
		t.Fatalf("procs after the kill: %v", pids)
	}
}

// TestKillSparesRecycledPid: Kill lists the group's processes (cgroup.procs) and
// then kills them. Here the listed process ends between the listing and the kill and
// a stranger outside the group is given its number (a forced reuse: the test runs in a
// pid namespace of its own and sets ns_last_pid). The kill opens a pidfd for each
// listed pid and only then checks it is still in the group: the stranger runs on.
// Before, Kill SIGKILLed the listed number: the stranger was killed.
func TestKillSparesRecycledPid(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	m := v1Root(t)
	g, err := m.Create("w", Limits{})
	must(t, err)
	run := exec.Command("/bin/sleep", "3600")
	must(t, g.Start(run))
	n := run.Process.Pid
	var stranger *exec.Cmd
	m.killListed = func(pids []int) {
		if stranger != nil || !slices.Contains(pids, n) {
			return
		}
		// Between the listing and the kill: the listed process ends, and the number
		// goes to a process outside the group.
		_ = run.Process.Kill()
		_ = run.Wait()
		stranger = exec.Command("/bin/sleep", "3600")
		testkit.StartAtPid(t, n, stranger)
	}
	must(t, g.Kill())
	if stranger == nil {
		t.Fatal("Kill's listing did not find the group's process")
	}
	hit := testkit.WaitFor(time.Second, func() bool { return !alive(n) })
	t.Logf("Kill whose listed pid %d went to a process outside the group before the kill: stranger killed %v", n, hit)
	if hit {
		t.Fatalf("Kill killed pid %d, a stranger outside the group given the listed process's number", n)
	}
	must(t, g.Remove())
	if !alive(n) {
		t.Fatal("Remove killed the stranger")
	}
}

// TestPgrpKillByNumberLoggedOnce: where the kernel refuses PIDFD_SIGNAL_PROCESS_GROUP
// (before Linux 6.9: EINVAL, played by a seccomp filter on the killing thread), the
// process groups outside cgroups are still killed, by their number, and the manager
// says so once, not at each group's kill.
func TestPgrpKillByNumberLoggedOnce(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the filter is written for amd64")
	}
	var logged testkit.Buffer
	m := Disabled("no cgroups in this test", slog.New(slog.NewTextHandler(&logged, nil)))
	var runs []*exec.Cmd
	var groups []*Group
	for _, id := range []string{"w", "x"} {
		g, err := m.Create(id, Limits{})
		must(t, err)
		run := exec.Command("/bin/sleep", "3600")
		must(t, g.Start(run))
		t.Cleanup(func() { _ = run.Process.Kill(); _ = run.Wait() })
		runs, groups = append(runs, run), append(groups, g)
	}
	errs := make(chan error, len(groups)+1)
	go func() {
		defer close(errs)
		runtime.LockOSThread() // never unlocked: the filtered thread ends with the goroutine
		// pidfd_send_signal with a flag (args[3]): EINVAL, as before 6.9.
		if err := testkit.DenySyscall(unix.SYS_PIDFD_SEND_SIGNAL, unix.EINVAL, 3); err != nil {
			errs <- err
			return
		}
		for _, g := range groups {
			errs <- g.Kill()
		}
	}()
	for err := range errs {
		must(t, err)
	}
	for _, run := range runs {
		if alive(run.Process.Pid) {
			t.Errorf("pid %d survived its group's kill by number", run.Process.Pid)
		}
	}
	if n := strings.Count(logged.String(), "killed by their number"); n != 1 {
		t.Errorf("%d warnings that process groups are killed by their number, want 1:\n%s", n, logged.String())
	}
}
