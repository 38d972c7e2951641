package bench

import (
	"bytes"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStoppedRunLeavesNothing runs nexbench (the binary) with a node and 60 workloads,
// stops it mid-run with a real signal and counts what of it still runs: with SIGINT and
// SIGTERM it stops all itself; killed with SIGKILL its nexd, nexlet and workloads
// outlive it (the fault: 95 processes were found so before this run's reaper existed),
// and the next run's harness reaps them, its cgroups and its temp dir.
func TestStoppedRunLeavesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs nexd and nexbench")
	}
	if os.Geteuid() != 0 || procsHierarchy() == "" || cgroupV1Root("probe") == "" {
		t.Skip("needs root and writable cgroup v1 hierarchies (the nodes' cgroups find what a run left)")
	}
	nexd, self := buildBins(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			outf, err := os.Create(filepath.Join(t.TempDir(), "nexbench.out"))
			if err != nil {
				t.Fatal(err)
			}
			defer outf.Close()
			out := func() string { b, _ := os.ReadFile(outf.Name()); return string(b) }
			cmd := exec.Command(self, "--nexd", nexd, "footprint", "--footprint", "60", "--idle", "1s", "-v")
			cmd.Stdout, cmd.Stderr = outf, outf
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan struct{})
			var waitErr error
			go func() {
				waitErr = cmd.Wait()
				close(exited)
			}()
			defer func() {
				_ = cmd.Process.Kill()
				<-exited
			}()
			// The run's cgroups, once 20 of its workloads run.
			var runID string
			var procs []int
			deadline := time.Now().Add(3 * time.Minute)
			for {
				if time.Now().After(deadline) {
					t.Fatalf("no run with 20 workloads within 3 min; nexbench says:\n%s", out())
				}
				select {
				case <-exited:
					t.Fatalf("nexbench ended (%v) before 20 workloads ran:\n%s", waitErr, out())
				case <-time.After(100 * time.Millisecond):
				}
				gs, _ := filepath.Glob(filepath.Join(procsHierarchy(), runPrefix+strconv.Itoa(cmd.Process.Pid)+"-*"))
				if len(gs) != 1 {
					continue
				}
				runID = strings.TrimPrefix(filepath.Base(gs[0]), runPrefix)
				// Its nexlet and 20 workloads in its groups (a workload's group is made
				// before its process joins it).
				groups := runGroups(runID)
				if below := procsBelow(groups); len(below) >= 21 {
					procs = append(nexdsBelow(groups), below...)
					break
				}
			}
			if len(procs) < 22 {
				t.Fatalf("the run's processes: %v; want its nexd, nexlet and 20 workloads at least", procs)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			select {
			case <-exited:
			case <-time.After(3 * time.Minute):
				t.Fatalf("nexbench still runs 3 min after %s:\n%s", sig, out())
			}
			if sig == syscall.SIGKILL {
				// Held as a reaper holds it, so that no other process's harness (another
				// bench test, a nexbench run on this host) reaps the run before this
				// test's harness: that one waits for this hold.
				locks, err := holdDeadRun(runID, deadRunWait)
				if err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Second)
				left := running(procs)
				t.Logf("killed with SIGKILL: %d of the run's %d processes still run", len(left), len(procs))
				for _, l := range locks {
					l.Release()
				}
				if len(left) == 0 {
					t.Fatal("nothing of the killed run outlived it: the reaper below is not tested")
				}
				// The next run reaps it on its start.
				h, err := NewHarness(Options{Nexd: nexd, Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
				if err != nil {
					t.Fatal(err)
				}
				h.Close()
			}
			if left := running(procs); len(left) > 0 {
				t.Errorf("after %s, %d of the run's %d processes still run: %v\nnexbench says:\n%s", sig, len(left), len(procs), left, out())
			}
			if gs := runGroups(runID); len(gs) > 0 {
				t.Errorf("after %s, the run's cgroups are left: %v", sig, gs)
			}
			if tmps, _ := filepath.Glob(filepath.Join(os.TempDir(), runPrefix+runID+"-*")); len(tmps) > 0 {
				t.Errorf("after %s, the run's temp dir is left: %v", sig, tmps)
			}
		})
	}
}

// running lists those of pids that still run (a zombie has ended).
func running(pids []int) []int {
	var out []int
	for _, p := range pids {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p), "stat"))
		if err != nil {
			continue
		}
		if i := bytes.LastIndexByte(b, ')'); i > 0 && len(b) > i+2 && b[i+2] == 'Z' {
			continue
		}
		out = append(out, p)
	}
	return out
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestRunNames: only nexbench's own run names are taken for runs.
func TestRunNames(t *testing.T) {
	for name, want := range map[string]int{
		"nexbench-123-ab12cd":                123,
		"nexbench-123-AB12CD":                0,
		"nexbench-123-ab12c":                 0,
		"nexbench-floor-123":                 0,
		"nexbench-0123-ab12cd":               0,
		"nexbench--ab12cd":                   0,
		"nexd":                               0,
		"nexbench-123-ab12cd-x":              0,
		"nexd-test-e2e-27109-8261-826104243": 0,
	} {
		pid, ok := isRunName(name)
		if ok != (want != 0) || pid != want {
			t.Errorf("isRunName(%q) = %d, %v; want %d", name, pid, ok, want)
		}
	}
}

// deadRun makes a dead run (a pid that ran and ended) and its cgroup directory in the
// procs hierarchy, and returns its id and that directory.
func deadRun(t *testing.T, id string) (runID, group string) {
	t.Helper()
	if os.Geteuid() != 0 || procsHierarchy() == "" {
		t.Skip("needs root and a writable cgroup v1 hierarchy (a dead run is found by its cgroup)")
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	runID = strconv.Itoa(dead.Process.Pid) + "-" + id
	group = filepath.Join(procsHierarchy(), runPrefix+runID)
	if err := os.Mkdir(group, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(group) })
	return runID, group
}

// TestReapSparesWhatItDidNotMake: a killed run's temp dir is found by name in /tmp,
// where anyone may make a name that matches: only a directory of nexbench's own user
// is removed, not another user's directory nor a symlink (before, both went: RemoveAll
// of every match).
func TestReapSparesWhatItDidNotMake(t *testing.T) {
	runID, group := deadRun(t, "zz9zz9")
	base := filepath.Join(os.TempDir(), runPrefix+runID+"-")
	own, other, link := base+"own", base+"other", base+"link"
	target := t.TempDir()
	for _, d := range []string{own, other} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(d) })
	}
	if err := os.Chown(other, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(other, "hers"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(link) })

	reapDead("self-"+runID, slog.New(slog.DiscardHandler))

	if _, err := os.Stat(own); err == nil {
		t.Errorf("the run's own temp dir %s was not removed", own)
	}
	if _, err := os.Stat(filepath.Join(other, "hers")); err != nil {
		t.Errorf("another user's directory %s was touched: %v", other, err)
	}
	if _, err := os.Lstat(link); err != nil {
		t.Errorf("a symlink %s the run did not make was removed: %v", link, err)
	}
	if _, err := os.Stat(group); err == nil {
		t.Errorf("the dead run's cgroup %s was not removed", group)
	}
}

// TestReapWaitsForAnotherReaper: every run reaps every dead run on the host at its
// start, so two may find the same one; the second found the run's groups held by the
// first, still killing, took the run for a live one and went on with its processes
// still running (the CI's TestStoppedRunLeavesNothing/killed: 13 of 25 left, the run's
// groups and temp dir too). It now waits for the holder and reaps what is left. The
// other reaper here holds the dead run's group, as reapDead does, and lets go without
// killing its process.
func TestReapWaitsForAnotherReaper(t *testing.T) {
	runID, group := deadRun(t, "zz8zz8")
	left := exec.Command("sleep", "60")
	if err := left.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = left.Process.Kill(); _ = left.Wait() })
	if err := os.WriteFile(filepath.Join(group, "cgroup.procs"), []byte(strconv.Itoa(left.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	other, err := holdDeadRun(runID, 0)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(300 * time.Millisecond)
		for _, l := range other {
			l.Release()
		}
	}()
	reapDead("self-"+runID, slog.New(slog.DiscardHandler))
	<-done
	if got := running([]int{left.Process.Pid}); len(got) > 0 {
		t.Errorf("the dead run's process %d still runs after reapDead (its group was held by another reaper)", left.Process.Pid)
	}
	if _, err := os.Stat(group); err == nil {
		t.Errorf("the dead run's cgroup %s was not removed", group)
	}
}

// TestKillIfSparesAnotherProcess: the reaper lists pids (cgroup.procs, /proc) and kills
// them a moment later, when a listed pid may name another process: killIf kills only a
// process still in the run. A process outside it is spared; one inside is killed.
func TestKillIfSparesAnotherProcess(t *testing.T) {
	outside := exec.Command("sleep", "60")
	if err := outside.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = outside.Process.Kill(); _ = outside.Wait() })
	pid := outside.Process.Pid
	if killIf(pid, func(pid int) bool { return inRun(pid, "1-zz9zz9") }) {
		t.Fatalf("killIf killed pid %d, which is in no cgroup of the run", pid)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("pid %d outside the run is gone: %v", pid, err)
	}
	if !killIf(pid, func(int) bool { return true }) {
		t.Fatalf("killIf did not kill pid %d, a member", pid)
	}
	if err := outside.Wait(); err == nil {
		t.Fatalf("pid %d was not killed", pid)
	}
}
