package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet/native"
)

// TestKilledNexletsLeaveNoLeases: a native nexlet killed (-9) leaves its pooled uids
// behind: their ready directories (<workloads>/.ready-<pid>-<start>-<uid>), their
// leases (naming /proc/<pid>) and systemd's lock files of those uids. Once the next
// nexlet nexd starts on the same runtime directory has settled (its own pool filled),
// none of the dead ones' is left, after each of three kills; the service running
// throughout keeps its directory, its lease and its process. Then the service's
// normal end and a clean stop of nexd leave nothing of theirs either, nor the node's
// workloads directory in /run/nex-workloads. Before, the
// leases and lock files stayed until a later lease happened to pick their uid: 700
// leases and 692 lock files after a day of test runs here.
func TestKilledNexletsLeaveNoLeases(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("dynamic uids need root")
	}
	t.Parallel()
	n, _ := nodeWithStops(t, nodeOpts{})
	marker := fmt.Sprintf("nexd-e2e-debris-%d", time.Now().UnixNano())
	svc := n.runWorkload(t, "--name", "svc", "--", "/bin/sh", "-c", "sleep 600; :", marker).ID
	wdir := workloadsDirOf(n)
	svcDir := filepath.Join(wdir, svc)
	var svcUIDs []uint32
	testkit.EventuallyWithin(t, 60*time.Second, "the service's lease and process", func() bool {
		svcUIDs = leasesNaming(svcDir)
		return len(svcUIDs) == 1 && len(shellsWithChild(marker)) == 1
	})
	svcProc := shellsWithChild(marker)

	const kills = 3
	var left debris
	for i := range kills {
		dead := nexletPID(n.cmd.Process.Pid)
		var pooled []uint32
		testkit.EventuallyWithin(t, 60*time.Second, "the nexlet's pooled uids", func() bool {
			pooled = readyUIDs(wdir, dead)
			return len(pooled) > 0 && len(leasesNaming("/proc/"+strconv.Itoa(dead))) > 0
		})
		killNexlet(t, n, nil)
		next := nexletPID(n.cmd.Process.Pid)
		testkit.EventuallyWithin(t, 60*time.Second, "the next nexlet's pool", func() bool {
			return len(readyUIDs(wdir, next)) > 0
		})
		got := leftOf(wdir, dead, pooled)
		t.Logf("kill %d: nexlet %d had %d pooled uids; left after the next one settled: %s", i+1, dead, len(pooled), got)
		left.add(got)
		if _, err := os.Stat(svcDir); err != nil {
			t.Errorf("kill %d: the service's directory: %v", i+1, err)
		}
		if u := leasesNaming(svcDir); len(u) != 1 || u[0] != svcUIDs[0] {
			t.Errorf("kill %d: leases naming the service's directory %v, want [%d]", i+1, u, svcUIDs[0])
		}
		if p := shellsWithChild(marker); len(p) != 1 || p[0] != svcProc[0] {
			t.Errorf("kill %d: the service's process %v, want %v", i+1, p, svcProc)
		}
	}
	if left.total() != 0 {
		t.Errorf("after %d kills, left of the dead nexlets: %s", kills, left)
	}

	// The service's normal end: its directory, lease and lock file go.
	if out, errOut, code := n.ctl(t, "workload", "stop", svc); code != 0 {
		t.Fatalf("workload stop: exit %d\n%s%s", code, out, errOut)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the service's directory, lease and lock file removed", func() bool {
		_, err := os.Stat(svcDir)
		return os.IsNotExist(err) && len(leasesNaming(svcDir)) == 0 && !lockFileLeft(svcUIDs[0])
	})

	// A clean stop: the last nexlet gives its pool back.
	last := nexletPID(n.cmd.Process.Pid)
	var pooled []uint32
	testkit.EventuallyWithin(t, 60*time.Second, "the last nexlet's pooled uids", func() bool {
		pooled = readyUIDs(wdir, last)
		return len(pooled) > 0
	})
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("nexd exited %d after SIGTERM\n%s", code, n.out.String())
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the nexlet's exit", func() bool { return syscall.Kill(last, 0) != nil })
	if got := leftOf(wdir, last, pooled); got.total() != 0 {
		t.Errorf("after a clean stop, left of nexlet %d: %s", last, got)
	}
	// Its directory in /run/nex-workloads (the test's runtime directory is under a 0700
	// temp dir) goes with it: nothing is left in it.
	if _, err := os.Stat(wdir); filepath.Dir(wdir) == "/run/nex-workloads" && !os.IsNotExist(err) {
		t.Errorf("after a clean stop, the node's workloads directory %s: %v, want removed", wdir, err)
	}
}

// workloadsDirOf is where the node's native nexlet keeps its workloads' directories: the
// one it names in its runtime directory (a runtime directory others cannot search, as a
// test's temp dir, has them in /run/nex-workloads/<hash>), else <runtime>/workloads.
func workloadsDirOf(n *node) string {
	rt := filepath.Join(n.stateDir, "run", "native")
	if b, err := os.ReadFile(filepath.Join(rt, "workloads-dir")); err == nil {
		return strings.TrimSpace(string(b))
	}
	return filepath.Join(rt, "workloads")
}

// readyUIDs are the uids of the ready directories nexlet pid made in wdir
// (.ready-<pid>-<start>-<uid>).
func readyUIDs(wdir string, pid int) []uint32 {
	ents, _ := os.ReadDir(wdir)
	var out []uint32
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), ".ready-"+strconv.Itoa(pid)+"-")
		if !ok {
			continue
		}
		f := strings.Split(rest, "-")
		if v, err := strconv.ParseUint(f[len(f)-1], 10, 32); err == nil {
			out = append(out, uint32(v))
		}
	}
	return out
}

// leasesNaming are the uids whose lease in the host's lease directory names owner.
func leasesNaming(owner string) []uint32 {
	ents, _ := os.ReadDir(native.DefaultLeaseDir)
	var out []uint32
	for _, e := range ents {
		v, err := strconv.ParseUint(e.Name(), 10, 32)
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join(native.DefaultLeaseDir, e.Name()))
		if line, _, _ := strings.Cut(string(b), "\n"); strings.TrimSpace(line) == owner {
			out = append(out, uint32(v))
		}
	}
	return out
}

// lockFileLeft says whether systemd's lock file of uid is there while no lease names
// uid, or only a stale one does (its owner gone): a lock file left behind. A uid leased
// since, by a test beside this one, has both.
func lockFileLeft(uid uint32) bool {
	name := strconv.FormatUint(uint64(uid), 10)
	if _, err := os.Stat(filepath.Join(native.DefaultSystemdUIDDir, name)); err != nil {
		return false
	}
	b, err := os.ReadFile(filepath.Join(native.DefaultLeaseDir, name))
	if err != nil {
		return os.IsNotExist(err)
	}
	owner, _, _ := strings.Cut(string(b), "\n")
	_, err = os.Lstat(strings.TrimSpace(owner))
	return os.IsNotExist(err)
}

// debris counts what a nexlet that is gone left of its pooled uids.
type debris struct{ ready, leases, locks int }

func (d *debris) add(o debris) { d.ready += o.ready; d.leases += o.leases; d.locks += o.locks }
func (d debris) total() int    { return d.ready + d.leases + d.locks }
func (d debris) String() string {
	return fmt.Sprintf("%d ready directories, %d leases, %d lock files", d.ready, d.leases, d.locks)
}

// leftOf counts what nexlet pid, gone, left: its ready directories in wdir, the leases
// naming it, and systemd's lock files of its pooled uids that no lease names.
func leftOf(wdir string, pid int, pooled []uint32) debris {
	d := debris{ready: len(readyUIDs(wdir, pid)), leases: len(leasesNaming("/proc/" + strconv.Itoa(pid)))}
	for _, uid := range pooled {
		if lockFileLeft(uid) {
			d.locks++
		}
	}
	return d
}
