package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nexletDirsFixture makes, in t's own directories, what a native nexlet killed at a
// test's end leaves: its workloads directory (named by its runtime directory, with its
// record) with a workload's directory in it, that workload's uid lease and the uid's
// systemd lock file. It returns the directories, the runtime directory and the paths
// that must go.
func nexletDirsFixture(t *testing.T) (d nexletDirs, runtimeDir string, made []string) {
	d, runtimeDir, made, _ = nexletDirsFixtureUID(t)
	return d, runtimeDir, made
}

// nexletDirsFixtureUID is nexletDirsFixture that also returns the workload's uid, the
// first of two reserved (UIDs).
func nexletDirsFixtureUID(t *testing.T) (d nexletDirs, runtimeDir string, made []string, uid uint32) {
	t.Helper()
	base := t.TempDir()
	d = nexletDirs{workloads: filepath.Join(base, "nex-workloads"), leases: filepath.Join(base, "nex-dynamic-uid"),
		systemdUIDs: filepath.Join(base, "dynamic-uid")}
	runtimeDir = t.TempDir()
	wdir := filepath.Join(d.workloads, "0123456789abcdef")
	uid = UIDs(t, 2)
	for _, dir := range []string{d.leases, d.systemdUIDs, filepath.Join(wdir, "w1")} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	WriteFile(t, filepath.Join(runtimeDir, "workloads-dir"), wdir+"\n")
	WriteFile(t, wdir+runtimeDirRecord, runtimeDir+"\n")
	WriteFile(t, filepath.Join(d.leases, ".lock"), "")
	WriteFile(t, filepath.Join(d.leases, fmt.Sprint(uid)), filepath.Join(wdir, "w1")+"\n")
	WriteFile(t, filepath.Join(d.systemdUIDs, fmt.Sprint(uid)), "")
	return d, runtimeDir, []string{wdir, wdir + runtimeDirRecord, filepath.Join(d.leases, fmt.Sprint(uid)),
		filepath.Join(d.systemdUIDs, fmt.Sprint(uid))}, uid
}

// left counts the paths still there.
func left(paths []string) int {
	n := 0
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			n++
		}
	}
	return n
}

// lockDir opens dir and takes its flock (how: unix.LOCK_EX, LOCK_SH).
func lockDir(t *testing.T, dir string, how int) *os.File {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestRemoveNexletDirsWaitsOutASweep: every native nexlet of the host sweeps the
// workloads directories of the others, each under its exclusive lock for a while (its
// walk of /proc), and keeps one whose runtime directory is there, as a test's is when
// its clean-up runs. The clean-up met such a lock, took the directory for a live
// nexlet's and left it with its uid lease and lock file (4 paths: e2e
// TestLiveRestoreAdoptsWithoutPrestart failed the binary's leftover check so at load
// 15, with other test binaries' nexlets beside it); it now waits for the sweep and
// removes them. A directory a nexlet holds (its shared lock: a live one) stays.
func TestRemoveNexletDirsWaitsOutASweep(t *testing.T) {
	t.Run("sweep", func(t *testing.T) {
		d, runtimeDir, made := nexletDirsFixture(t)
		sweep := lockDir(t, made[0], unix.LOCK_EX)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(100 * time.Millisecond) // the sweep's walk; the clean-up starts meanwhile
			sweep.Close()
		}()
		d.remove(runtimeDir, sweepWait)
		wg.Wait()
		if n := left(made); n != 0 {
			t.Errorf("%d of %d entries left after a sweep held the workloads directory", n, len(made))
		}
	})
	t.Run("live nexlet", func(t *testing.T) {
		d, runtimeDir, made := nexletDirsFixture(t)
		nexlet := lockDir(t, made[0], unix.LOCK_SH)
		defer nexlet.Close()
		d.remove(runtimeDir, sweepWait)
		if n := left(made); n != len(made) {
			t.Errorf("%d of %d entries of a live nexlet's workloads directory left, want all", n, len(made))
		}
	})
	// A nexlet's uid leased ahead (its lease names /proc/<pid>, its directory made ahead
	// .ready-<pid>-<start>-<uid>) goes when that nexlet, killed, has let go of the
	// directory but is still in /proc (it was left so: e2e TestLiveRestoreAdoptsWithout-
	// Prestart's 7 pooled leases after each run); one whose pid is a stranger's now
	// (another start time) stays. A live process plays each.
	for _, c := range []struct {
		name     string
		stranger bool
	}{{"dying nexlet", false}, {"pid reused", true}} {
		t.Run(c.name, func(t *testing.T) {
			d, runtimeDir, made, uid := nexletDirsFixtureUID(t)
			proc := exec.Command("sleep", "60")
			if err := proc.Start(); err != nil {
				t.Fatal(err)
			}
			defer proc.Wait()
			defer proc.Process.Kill()
			pid := fmt.Sprint(proc.Process.Pid)
			start, ok := procStart(pid)
			if !ok || start == "" {
				t.Fatalf("no start time of %s", pid)
			}
			if c.stranger {
				start += "1"
			}
			ahead := uid + 1
			ready := filepath.Join(made[0], fmt.Sprintf(".ready-%s-%s-%d", pid, start, ahead))
			if err := os.Mkdir(ready, 0o755); err != nil {
				t.Fatal(err)
			}
			lease := WriteFile(t, filepath.Join(d.leases, fmt.Sprint(ahead)), "/proc/"+pid+"\n")
			d.remove(runtimeDir, sweepWait)
			if n := left(made); n != 0 {
				t.Errorf("%d of %d entries left", n, len(made))
			}
			if n := left([]string{lease}); n != map[bool]int{false: 0, true: 1}[c.stranger] {
				t.Errorf("%d leases naming /proc/%s left (its start time %s in the directory made ahead)", n, pid, start)
			}
		})
	}
	t.Run("unheld", func(t *testing.T) {
		d, runtimeDir, made := nexletDirsFixture(t)
		d.remove(runtimeDir, sweepWait)
		if n := left(made); n != 0 {
			t.Errorf("%d of %d entries left", n, len(made))
		}
	})
}

// TestDebrisTiedToTheTestsRun: the leftover check (Binaries.Run) ties the temp dirs in
// the host's directories only to the tests the run's -test.run selects. A run of one
// test (a probe's copy of the binary) took another run's leftovers of any test of the
// binary for its own and failed.
func TestDebrisTiedToTheTestsRun(t *testing.T) {
	for run, want := range map[string]string{
		"^TestA$":         "^TestA$",
		"^TestA$/^sub$":   "^TestA$",
		"Test[/]A/b":      "Test[/]A",
		"Test(x|/)A/b":    "Test(x|/)A",
		`Test\/A/b`:       `Test\/A`,
		"":                "",
		"TestA|TestB/sub": "TestA|TestB",
	} {
		if got := topLevelPattern(run); got != want {
			t.Errorf("topLevelPattern(%q) = %q, want %q", run, got, want)
		}
	}
	if got := testNamesMatching("^TestWaitFor$"); !slices.Equal(got, []string{"TestWaitFor"}) {
		t.Errorf("tests matching ^TestWaitFor$: %v", got)
	}
	if all := testNamesMatching("."); len(all) < 5 || !slices.Contains(all, "TestDebrisTiedToTheTestsRun") {
		t.Errorf("all tests: %v", all)
	}
}
