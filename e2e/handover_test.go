package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
)

// markerPIDs lists the live processes whose command line contains marker.
func markerPIDs(marker string) []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), marker) {
			continue
		}
		if st := procStatus(pid, "State"); st == "" || strings.HasPrefix(st, "Z") {
			continue
		}
		out = append(out, pid)
	}
	slices.Sort(out)
	return out
}

// shellsWithChild is markerPIDs once each of them (a `sh -c "sleep 600; :" marker`) has
// forked its sleep and the sleep has exec'd, else nil: a snapshot taken earlier could
// catch the fork's child still running sh with the marker in its cmdline, a pid that
// is gone a moment later.
func shellsWithChild(marker string) []int {
	pids := markerPIDs(marker)
	for _, p := range pids {
		if !execedChild(p) {
			return nil
		}
	}
	return pids
}

// execedChild reports whether pid has a child that no longer runs pid's own command.
func execedChild(pid int) bool {
	own, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	for _, c := range strings.Fields(string(b)) {
		if cmd, err := os.ReadFile(filepath.Join("/proc", c, "cmdline")); err == nil && len(cmd) > 0 && !bytes.Equal(cmd, own) {
			return true
		}
	}
	return false
}

// corruptHandover watches nexd (pid) for the memfd of its re-exec hand-over and, the
// moment it appears (between the old image writing it and the new one reading it),
// overwrites it with garbage through /proc/<pid>/fd, as a bug or a bit flip would.
// It returns once that was done (true) or after timeout (false).
func corruptHandover(pid int, timeout time.Duration) bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			link, err := os.Readlink(filepath.Join(dir, e.Name()))
			if err != nil || !strings.HasPrefix(link, "/memfd:nexd-handover") {
				continue
			}
			f, err := os.OpenFile(filepath.Join(dir, e.Name()), os.O_WRONLY|os.O_TRUNC, 0)
			if err != nil {
				continue
			}
			_, err = f.WriteString("\x00garbage{not the hand-over")
			f.Close()
			if err == nil {
				return true
			}
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// TestReexecHandover: `nexctl node reexec` hands the new image the native nexlet's record
// and the workload users the minter remembers in a memfd.
//
//  1. A good hand-over: a workload's user minted before the exec (a stolen copy of its
//     credentials) is revoked when the workload is stopped after the exec; without the
//     hand-over the new image knew only the user it minted itself and the stolen one
//     stayed valid until it expired.
//  2. A corrupt hand-over (garbage written into the memfd between the old image and
//     the new one): the new image says so and falls back to the state directory: the
//     same native nexlet, every workload the same process, listed running, and a job
//     that ends after the exec has its end reported (it leaves the node's state).
func TestReexecHandover(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("corrupting nexd's memfd through /proc/<pid>/fd needs root")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{extra: []string{"--state", "kv"}})
	n.waitReady(t)
	pid := n.cmd.Process.Pid
	nexlet := nexletPID(pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	marker := fmt.Sprintf("nexd-e2e-handover-%d", time.Now().UnixNano())
	const services = 5
	var ids []string
	for i := range services {
		ids = append(ids, n.runWorkload(t, "--name", fmt.Sprintf("s%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker).ID)
	}
	leak := `cat "$NEX_WORKLOAD_NATS_CREDS_FILE"; exec sleep 600`
	leaky := n.runWorkload(t, "--name", "leaky", "--", "/bin/sh", "-c", leak).ID
	var before []int
	testkit.EventuallyWithin(t, 60*time.Second, "every service runs with its sleep", func() bool {
		before = shellsWithChild(marker)
		return len(before) == services
	})
	connects := func(creds string) error {
		nc, err := nats.Connect(n.natsURL, nats.UserCredentials(creds), nats.NoReconnect(), nats.Timeout(5*time.Second))
		if err == nil {
			nc.Close()
		}
		return err
	}
	stolen, _ := stolenCreds(t, n, leaky)
	if err := connects(stolen); err != nil {
		t.Fatalf("the leaked credentials do not even work while the workload runs: %v", err)
	}
	readies := 1
	reexec := func(what string) {
		t.Helper()
		n.mustCtl(t, "node", "reexec")
		readies++
		testkit.EventuallyWithin(t, 60*time.Second, what+": the re-executed nexd ready again", func() bool {
			return strings.Count(n.out.String(), "nex node ready") >= readies
		})
		n.waitReady(t)
		select {
		case <-n.done:
			t.Fatalf("%s: nexd exited instead of re-executing: %v", what, n.err)
		default:
		}
	}
	same := func(what string) {
		t.Helper()
		testkit.EventuallyWithin(t, 60*time.Second, what+": every workload listed running", func() bool {
			running := 0
			for _, w := range n.workloads(t) {
				if w.State == "running" && slices.Contains(ids, w.ID) {
					running++
				}
			}
			return running == services
		})
		if got := markerPIDs(marker); !slices.Equal(got, before) {
			t.Fatalf("%s: workload processes %v, before %v", what, got, before)
		}
		if st := procStatus(nexlet, "State"); st == "" || strings.HasPrefix(st, "Z") {
			t.Fatalf("%s: the native nexlet %d is gone", what, nexlet)
		}
		if p := nexletPID(pid); p != nexlet {
			t.Fatalf("%s: the native nexlet is %d, before %d: not adopted", what, p, nexlet)
		}
	}

	// 1. A good hand-over carries the stolen user across: the stop revokes it.
	reexec("good hand-over")
	if !strings.Contains(n.out.String(), "re-exec: state handed over in a memfd") {
		t.Fatalf("the re-executed nexd did not read the memfd hand-over:\n%s", n.out.String())
	}
	same("good hand-over")
	if err := connects(stolen); err != nil {
		t.Fatalf("the leaked credentials stopped working before the stop: %v", err)
	}
	n.mustCtl(t, "workload", "stop", leaky)
	testkit.EventuallyWithin(t, 15*time.Second, "the user minted before the exec refused after the workload's stop", func() bool {
		return connects(stolen) != nil
	})

	// 2. A corrupt hand-over: the state directory is enough.
	release := filepath.Join(testkit.PublicDir(t), "release")
	job := n.runWorkload(t, "--name", "job", "--lifecycle", "job", "--",
		"/bin/sh", "-c", `while [ ! -e "$0" ]; do sleep 0.1; done; exit 4`, release).ID
	testkit.EventuallyWithin(t, 30*time.Second, "the job runs", func() bool {
		return len(markerPIDs(release)) > 0
	})
	var corrupted atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		corrupted.Store(corruptHandover(pid, 60*time.Second))
	}()
	reexec("corrupt hand-over")
	<-done
	if !corrupted.Load() {
		t.Fatal("the test did not catch the hand-over memfd to corrupt it")
	}
	if !strings.Contains(n.out.String(), "the state handed over in the memfd is unusable; rebuilding it from the state directory") {
		t.Fatalf("the new image did not report the corrupt hand-over:\n%s", n.out.String())
	}
	same("corrupt hand-over")
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	nodeID := n.waitReady(t).NodeID
	testkit.EventuallyWithin(t, 60*time.Second, "the job that ended after the fallback left the node's state", func() bool {
		return !strings.Contains(n.mustCtl(t, "node", "state", nodeID), job)
	})
}
