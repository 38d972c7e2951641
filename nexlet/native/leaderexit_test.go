package native

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackLeaderExitOutlivesStop: a workload (a named user's, which no uid release
// follows) forks a daemon (deaf to SIGTERM) whose main thread exits alone (exit(2), not
// exit_group(2)): State Z in /proc/<pid>/stat while its other threads run on in the
// workload's cgroup. The workload's own main process ends at the stop's SIGTERM; the
// kill of what is left in its cgroup (v1: process by process, no cgroup.kill) took the
// daemon for a zombie, left it out and found the cgroup empty: the stop answered with
// the daemon's threads still running, as the workload's user, for good. The cgroup's
// listing counts such a process as running since 0d684fa (procid.Stat.Runs), and the
// stop kills it; this is the forked-daemon case of TestStopKillsThreadsOfExitedMainThread.
func TestAttackLeaderExitOutlivesStop(t *testing.T) {
	needRoot(t)
	spec := cgroupSpec(t)
	u := testkit.NewUser(t)
	bin := bins.Path(t, "./testdata/leaderexit")
	fn := newFakeNode(t)
	fn.startNexlet(Config{Cgroup: spec, Users: UserPolicy{Allowed: []string{u.Name}}})
	pidFile := filepath.Join(sharedDir(t), "daemon.pid")
	uri := script(t, `"$1" deaf >/dev/null & echo $! > "$2"; echo forked; exec sleep 3600`)
	fn.mustStart("leaderexit", startReq(protocol.LifecycleService, "leaderexit", map[string]any{"uri": uri, "argv": []string{bin, pidFile}, "user": u.Name}, fn.creds()))
	fn.waitLog("leaderexit", "stdout", "forked")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	testkit.Eventually(t, "the daemon's main thread ended alone, its others run", func() bool {
		st, err := procid.ReadStat(pid)
		return err == nil && st.State == 'Z' && st.Threads > 1
	})
	resp := fn.stop("leaderexit", testNS)
	st, err := procid.ReadStat(pid)
	t.Logf("stop: %+v; the daemon (pid %d) after it: State %c Threads %d (err %v)", resp, pid, st.State, st.Threads, err)
	if err == nil && st.Runs() {
		t.Errorf("the workload's daemon still runs %d threads as %s after the stop answered", st.Threads, u.Name)
	}
}

// TestRunningCountsThreadsOfExitedLeader: the systemd driver's placement (placed) asks
// running whether a process systemd did not take into its scope ended meanwhile, and
// leaves it where it was born when it did: outside any scope, without limits where
// there is no holding group. A process whose main thread exited alone while its other
// threads run was taken for ended (before 0d684fa). This machine has no systemd as init
// (no scope can be made here), so the predicate is tested on testdata/leaderexit:
// running now, and not once its threads ended (killed, not reaped).
func TestRunningCountsThreadsOfExitedLeader(t *testing.T) {
	cmd := exec.Command(bins.Path(t, "./testdata/leaderexit"))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	buf := make([]byte, 16)
	n, rerr := out.Read(buf)
	if rerr != nil || !strings.HasPrefix(string(buf[:n]), "ready") {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("helper: %q %v", buf[:n], rerr)
	}
	pid := cmd.Process.Pid
	testkit.Eventually(t, "the main thread ended alone, another runs", func() bool {
		return strings.HasPrefix(statusField(t, pid, "State"), "Z") && statusField(t, pid, "Threads") != "1"
	})
	if !running(pid) {
		t.Errorf("running(%d) = false with its threads running (Threads: %s)", pid, statusField(t, pid, "Threads"))
	}
	if !alive(pid) {
		t.Errorf("the tests' alive(%d) = false with its threads running", pid)
	}
	_ = cmd.Process.Kill()
	testkit.EventuallyWithin(t, 10*time.Second, "its threads ended", func() bool { return statusField(t, pid, "Threads") == "1" })
	if running(pid) {
		t.Errorf("running(%d) = true for a zombie whose threads ended", pid)
	}
	go func() { _ = cmd.Wait(); close(reaped) }()
	<-reaped
}
