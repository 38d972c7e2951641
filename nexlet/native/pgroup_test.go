package native

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestProcessGroupSandboxSparesRecycledNumber: without cgroups a workload's sandbox is
// its process group, named by its main process's pid. Once the run ended (killed and
// reaped, its group empty) the kernel hands that number out again; here a stranger's
// group leader (another workload, any process of the host) and its child get it. Before,
// the sandbox kept the bare number: its procs listed the stranger (an adopted workload
// was never seen to end) and its kill (the stop, the tidy, a restart's leftovers)
// SIGKILLed both strangers, 2 processes of another owner. The sandbox of a replayed
// workload, named by its pid record reread after a nexlet restart, did the same. Now
// neither lists nor kills anything of the stranger.
func TestProcessGroupSandboxSparesRecycledNumber(t *testing.T) {
	for _, how := range []string{"started", "replayed"} {
		t.Run(how, func(t *testing.T) {
			if !testkit.InPidNamespace(t) {
				return
			}
			iso := noIsolation{dir: t.TempDir()}
			sb, err := iso.sandbox("w1", Limits{})
			if err != nil {
				t.Fatal(err)
			}
			run := exec.Command("/bin/sleep", "3600")
			if how == "started" {
				if err := sb.start(run); err != nil {
					t.Fatal(err)
				}
			} else {
				// Started by the nexlet before this one, recorded; this nexlet
				// finds it by the record.
				run.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
				if err := run.Start(); err != nil {
					t.Fatal(err)
				}
				id, err := procid.Of(run.Process.Pid)
				if err != nil {
					t.Fatal(err)
				}
				testkit.WriteFile(t, filepath.Join(iso.dir, "w1", "pid"), id.Format())
				if sb, err = iso.sandbox("w1", Limits{}); err != nil {
					t.Fatal(err)
				}
			}
			n := run.Process.Pid
			if ps, err := sb.procs(); err != nil || len(ps) == 0 {
				t.Fatalf("procs of the running workload: %v, %v", ps, err)
			}
			_ = run.Process.Kill()
			_ = run.Wait()

			child := testkit.StrangerGroupAt(t, n)
			ps, err := sb.procs()
			if err != nil {
				t.Fatal(err)
			}
			if err := sb.kill(); err != nil {
				t.Fatal(err)
			}
			// A SIGKILL takes a moment to land: wait (bounded) for all of it.
			killed := 0
			testkit.WaitFor(time.Second, func() bool {
				killed = 0
				for _, p := range []int{n, child} {
					if !running(p) {
						killed++
					}
				}
				return killed == 2
			})
			if len(ps) != 0 || killed != 0 {
				t.Fatalf("the ended workload's sandbox listed %v and killed %d of 2 processes of a stranger's group with its old number %d", ps, killed, n)
			}
			if err := sb.remove(); err != nil || !running(n) || !running(child) {
				t.Fatalf("remove: %v; the stranger runs: %v %v", err, running(n), running(child))
			}
			_ = os.Remove(filepath.Join(iso.dir, "w1", "pid"))
		})
	}
}

// TestProcessGroupSandboxKillsLeftovers: what a run left in its process group is still
// the workload's once its main process is reaped, since the sandbox noted its members
// while the exited main process waited to be reaped (exiting): the stop's or the end's
// kill finds and kills it.
func TestProcessGroupSandboxKillsLeftovers(t *testing.T) {
	sb, err := noIsolation{dir: t.TempDir()}.sandbox("w1", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	run := exec.Command("/bin/sh", "-c", "sleep 3600 & echo $!")
	out, err := run.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sb.start(run); err != nil {
		t.Fatal(err)
	}
	var left int
	if _, err := fmt.Fscan(out, &left); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(left, syscall.SIGKILL) })
	var info unix.Siginfo
	if err := unix.Waitid(unix.P_PID, run.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil); err != nil {
		t.Fatal(err)
	}
	sb.exiting()
	_ = run.Wait()
	if ps, err := sb.procs(); err != nil || len(ps) == 0 {
		t.Fatalf("procs after the main process's reap: %v, %v; want its group, which holds the leftover %d", ps, err, left)
	}
	if err := sb.kill(); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 5*time.Second, "the leftover killed", func() bool { return !running(left) })
	// Empty once its zombie is reaped (by init here, by nexd on a node).
	testkit.EventuallyWithin(t, 5*time.Second, "the group empty", func() bool { ps, _ := sb.procs(); return len(ps) == 0 })
}

// TestStopInBackoffSparesRecycledProcessGroup: a service without cgroups whose run
// ended waits out its restart backoff; meanwhile its run's process group number goes to
// a stranger's group leader and its child (another workload, any process of the host).
// The stop in the backoff kills what is left of the workload before its tidy. Before,
// that kill was kill(-pgid) of the ended run's number: it SIGKILLed 2 of 2 stranger
// processes; now it finds the group gone and kills none.
func TestStopInBackoffSparesRecycledProcessGroup(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	fn := newFakeNode(t)
	// No cgroup subtree: workloads in process groups. Its uids, leases and systemd's
	// locks are its own, not the host's shared ones: from this pid namespace a host
	// nexlet's pooled or retired lease names an owner that looks gone (/proc/<pid> is
	// the namespace's), so a lease here takes such a uid as stale wherever no systemd
	// lock guards it, and its walks see none of the host's processes running as a uid.
	lo := testkit.UIDs(t, 16)
	tn := fn.startNexlet(Config{Users: UserPolicy{UIDMin: lo, UIDMax: lo + 15, LeaseDir: t.TempDir(),
		SystemdUIDDir: filepath.Join(t.TempDir(), "dynamic-uid")}})
	if tn.iso.mode() != "none" {
		t.Fatalf("isolation %s, want none", tn.iso.mode())
	}
	fn.mustStart("svc", startReq(protocol.LifecycleService, "svc", map[string]any{
		"uri": script(t, "exit 3"), "restart": map[string]any{"policy": "always", "max": 5, "backoff": "30s"}}, fn.creds()))
	testkit.Eventually(t, "the service's first run ended and its restart waits out the backoff", func() bool {
		_, due := tn.readRestartDue("svc")
		return due
	})
	rec, ok := tn.readPID("svc")
	if !ok {
		t.Fatal("no pid record of the ended run")
	}
	child := testkit.StrangerGroupAt(t, rec.PID)
	if resp := fn.stop("svc", testNS); !resp.Stopped {
		t.Fatalf("stop: %+v", resp)
	}
	fn.stoppedEvent("svc") // its tidy done
	killed := 0
	for _, p := range []int{rec.PID, child} {
		if !running(p) {
			killed++
		}
	}
	if killed != 0 {
		t.Fatalf("the stop of the service in its backoff killed %d of 2 processes of a stranger's group with its ended run's number %d", killed, rec.PID)
	}
}
