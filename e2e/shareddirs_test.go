package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/dirlock"
	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// startOnDirs starts a nexd of its own (own control socket, cgroup root and embedded
// NATS) on the given runtime dir and, when stateDir is set, state dir.
func startOnDirs(t *testing.T, runtimeDir, stateDir string) *node {
	t.Helper()
	n := &node{socket: filepath.Join(t.TempDir(), "nexd.sock"), embedded: true, stateDir: stateDir}
	args := []string{"--runtime-dir", runtimeDir, "--control-socket", n.socket, "--node-name", "e2e",
		"--startup-timeout", "60s"}
	if stateDir != "" {
		args = append(args, "--state-dir", stateDir)
	}
	testkit.CleanNexletDirs(t, filepath.Join(runtimeDir, "native"))
	if n.cgroup = cgroupRoot(t); n.cgroup != "" {
		args = append(args, "--cgroup-root", n.cgroup)
	}
	n.proc = startNexd(t, nexdOpts{args: args, env: []string{"NEXD_EMBEDDED_NATS_PORT=-1"}})
	return n
}

// alive: pid runs (and is no zombie).
func alive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	st, err := procid.ReadStat(pid)
	return err == nil && st.State != 'Z'
}

// TestSecondNexdOnSharedDirsRefused: two nexd given one runtime dir (without state
// dirs, or one state dir) must not interfere. The first's native nexlet and workload
// are counted after the second's start: the second nexd refuses to start, naming the
// directory and the first's pid, and nothing of the first is lost.
func TestSecondNexdOnSharedDirsRefused(t *testing.T) {
	needCgroupV1(t, "to find the first node's workload processes")
	t.Parallel()
	for _, tc := range []struct {
		name        string
		sharedState bool
	}{{"runtime dir, no state dirs", false}, {"state dir", true}} {
		t.Run(tc.name, func(t *testing.T) {
			// One state dir: the runtime dir is its default, <state_dir>/run, too.
			runtime, state, dir := testkit.PublicDir(t), t.TempDir(), ""
			if dir = runtime; tc.sharedState {
				dir = state
			}
			var first *node
			if tc.sharedState {
				first = startNode(t, nodeOpts{stateDir: state})
			} else {
				first = startOnDirs(t, runtime, "")
			}
			first.waitReady(t)
			w := first.runWorkload(t, "--bids", "1", "--name", "keep", "--", "/bin/sleep", "600")
			var procs []int
			testkit.Eventually(t, "the first node's workload runs", func() bool {
				procs = first.groupProcs(w.ID)
				return len(procs) == 1
			})
			nexlet := first.native(t).PID

			var second *node
			if tc.sharedState {
				second = startNode(t, nodeOpts{stateDir: state})
			} else {
				second = startOnDirs(t, runtime, "")
			}
			// The second either gives up or comes up (and then has had its chance to
			// clean up or adopt what it found).
			testkit.EventuallyWithin(t, 90*time.Second, "the second nexd exits or is ready", func() bool {
				select {
				case <-second.done:
					return true
				default:
				}
				return strings.Contains(second.out.String(), "nex node ready")
			})
			// Whatever the second did to the first has had a moment to land.
			time.Sleep(2 * time.Second)
			lost := 0
			if !alive(int(nexlet)) {
				lost++
				t.Errorf("the first node's native nexlet (pid %d) is gone", nexlet)
			}
			for _, p := range procs {
				if !alive(p) {
					lost++
					t.Errorf("the first node's workload %s (pid %d) is gone", w.ID, p)
				}
			}
			if st := first.native(t); st.PID != nexlet {
				t.Errorf("the first node's native nexlet is now pid %d, was %d", st.PID, nexlet)
			}
			select {
			case <-second.done:
			default:
				t.Fatalf("the second nexd on %s started (lost of the first: %d)", dir, lost)
			}
			code := second.wait(t, time.Second)
			out := second.out.String()
			if code == 0 || !strings.Contains(out, dir) || !strings.Contains(out, "pid "+strconv.Itoa(first.cmd.Process.Pid)) {
				t.Fatalf("second nexd: exit %d, want an error naming %s and pid %d:\n%s", code, dir, first.cmd.Process.Pid, out)
			}
		})
	}
}

// TestReexecKeepsDirLocks: a re-executing nexd keeps its state and runtime dirs and
// its cgroup root locked through the execve, so no other nexd can take them between
// the old image's stop and the new one's start. Another process tries to take each
// lock all along (as a second nexd on the same dirs or cgroup_root would, by its
// start): it never gets one, and the re-executed nexd comes back with all of them and
// its nexlet. Before, the old image let go at its stop: the prober took a lock in that
// gap, and the new image exited with "held by another process" (a second nexd would
// have adopted the first's nexlets, or killed what ran under the root as leftovers).
func TestReexecKeepsDirLocks(t *testing.T) {
	t.Parallel()
	state := t.TempDir()
	n := startNode(t, nodeOpts{stateDir: state})
	n.waitReady(t)
	pid := n.cmd.Process.Pid
	nexlet := nexletPID(pid)
	type lock struct {
		what string
		take func() error // nil: taken (and let go again)
	}
	locks := []lock{}
	for _, lk := range []struct{ dir, name string }{{state, "nexd-state.lock"}, {filepath.Join(state, "run"), "nexd-runtime.lock"}} {
		locks = append(locks, lock{lk.name, func() error {
			l, err := dirlock.Hold(lk.dir, lk.name, 0o700)
			if err == nil {
				l.Release()
			} else if !errors.Is(err, dirlock.ErrHeld) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(pid)) {
				return fmt.Errorf("%v, want held by nexd (pid %d)", err, pid) // not ErrHeld: the check after the re-exec fails
			}
			return err
		}})
	}
	if n.cgroup != "" {
		// The cgroup root is locked as the directory itself (a flock on it), as any
		// nexd given the same cgroup_root tries it.
		locks = append(locks, lock{"cgroup root " + n.cgroup, func() error {
			f, err := os.Open(n.cgroup)
			if err != nil {
				return err
			}
			defer f.Close()
			return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		}})
	} else {
		t.Log("no cgroup root (no writable cgroup v1): its lock is not probed")
	}
	stop := make(chan struct{})
	taken := make(chan string, 1)
	var wg sync.WaitGroup
	wg.Go(func() {
		for tries := 0; ; tries++ {
			select {
			case <-stop:
				return
			default:
			}
			for _, lk := range locks {
				if lk.take() == nil {
					taken <- fmt.Sprintf("%s taken by another process at try %d", lk.what, tries)
					return
				}
			}
		}
	})
	n.mustCtl(t, "node", "reexec")
	testkit.EventuallyWithin(t, 60*time.Second, "the re-executed nexd ready again", func() bool {
		select {
		case <-n.done:
			return true
		default:
		}
		return strings.Count(n.out.String(), "nex node ready") >= 2
	})
	close(stop)
	wg.Wait()
	select {
	case what := <-taken:
		t.Errorf("during the re-exec: %s", what)
	default:
	}
	select {
	case <-n.done:
		t.Fatalf("nexd exited instead of re-executing: %v\n%s", n.err, n.out.String())
	default:
	}
	n.waitReady(t)
	if p := nexletPID(pid); p != nexlet {
		t.Errorf("the native nexlet is %d, before %d: not adopted", p, nexlet)
	}
	for _, lk := range locks {
		if err := lk.take(); !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, dirlock.ErrHeld) {
			t.Errorf("%s after the re-exec: %v, want it held by nexd (pid %d)", lk.what, err, pid)
		}
	}
}
