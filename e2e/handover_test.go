package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
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

// handoverCatch is what corruptHandover did with a re-exec's hand-over memfd.
type handoverCatch int

const (
	handoverMissed    handoverCatch = iota // not seen before the new image read it
	handoverCorrupted                      // overwritten before the new image read it
)

// corruptHandover watches nexd (pid) for the memfd of its re-exec hand-over and, once it
// holds the old image's state and the new image has not read it, overwrites it with
// garbage through /proc/<pid>/fd, as a bug or a bit flip would. nexd is stopped
// (SIGSTOP) while the memfd's size and nexd's file offset in it are checked and the
// garbage written, so the new image cannot read it meanwhile: a write that lands after
// the read (a starved poller) is never counted as a corruption. It returns
// handoverCorrupted once done, handoverMissed when it saw the memfd already read or
// when stop is closed first (the poller never saw it while it was there).
func corruptHandover(t *testing.T, pid int, stop <-chan struct{}) handoverCatch {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	for {
		select {
		case <-stop:
			return handoverMissed
		default:
		}
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if link, err := os.Readlink(filepath.Join(dir, e.Name())); err != nil || !strings.HasPrefix(link, "/memfd:nexd-handover") {
				continue
			}
			if c, ok := corruptStopped(t, pid, e.Name()); ok {
				return c
			}
		}
		time.Sleep(time.Millisecond)
	}
}

// corruptStopped stops pid and, if its descriptor fd is still the hand-over memfd,
// written (not empty) and unread (offset 0), overwrites it; ok false: look again (the
// memfd was gone or not written yet).
func corruptStopped(t *testing.T, pid int, fd string) (handoverCatch, bool) {
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return handoverMissed, false
	}
	defer func() {
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			t.Errorf("SIGCONT nexd %d: %v", pid, err)
		}
	}()
	// Every thread stopped (twice in a row: a thread the first look missed shows in the
	// second): none is inside a read of the memfd any more. An execve under way drops a
	// SIGSTOP or cancels its group stop (the kernel's de_thread), so it is sent again
	// until it holds: at load 12 one sent just before the exec was lost, and nexd ran on.
	if !testkit.WaitFor(30*time.Second, func() bool {
		if allStopped(pid) {
			if again := allStopped(pid); again {
				return true
			}
		}
		_ = syscall.Kill(pid, syscall.SIGSTOP)
		return false
	}) {
		t.Errorf("nexd %d did not stop on SIGSTOP within 30 s", pid)
		return handoverMissed, true
	}
	path := fmt.Sprintf("/proc/%d/fd/%s", pid, fd)
	if link, err := os.Readlink(path); err != nil || !strings.HasPrefix(link, "/memfd:nexd-handover") {
		return handoverMissed, false // closed meanwhile: read, or the number reused
	}
	info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd))
	if err != nil {
		return handoverMissed, false
	}
	var pos int64 = -1
	for _, l := range strings.Split(string(info), "\n") {
		if v, ok := strings.CutPrefix(l, "pos:"); ok {
			pos, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	switch st, err := os.Stat(path); {
	case err != nil:
		return handoverMissed, false
	case pos != 0:
		return handoverMissed, true // the new image has read (some of) it
	case st.Size() == 0:
		return handoverMissed, false // the old image has not written it yet
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Errorf("open nexd's hand-over memfd: %v", err)
		return handoverMissed, true
	}
	defer f.Close()
	if _, err := f.WriteString("\x00garbage{not the hand-over"); err != nil {
		t.Errorf("write nexd's hand-over memfd: %v", err)
		return handoverMissed, true
	}
	return handoverCorrupted, true
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
	// The poller may be too late on a loaded host (it saw the memfd only once read, or
	// not at all): then that re-exec had a good hand-over, and another is tried.
	const attempts = 5
	for attempt := 1; ; attempt++ {
		from := len(n.out.String())
		var c handoverCatch
		func() {
			stop := make(chan struct{})
			caught := make(chan handoverCatch, 1)
			go func() { caught <- corruptHandover(t, pid, stop) }()
			defer func() { close(stop); c = <-caught }() // also when reexec fails the test
			reexec(fmt.Sprintf("corrupt hand-over (attempt %d)", attempt))
		}()
		out := n.out.String()[from:]
		unusable := strings.Contains(out, "the state handed over in the memfd is unusable; rebuilding it from the state directory")
		good := strings.Contains(out, "re-exec: state handed over in a memfd")
		if c == handoverCorrupted {
			if !unusable || good {
				t.Fatalf("the new image did not report the corrupt hand-over (attempt %d):\n%s", attempt, out)
			}
			break
		}
		if !good || unusable {
			t.Fatalf("attempt %d: the hand-over was not corrupted, yet the new image did not read it:\n%s", attempt, out)
		}
		if attempt == attempts {
			t.Fatalf("the test did not catch the hand-over memfd unread in %d re-execs", attempts)
		}
		t.Logf("attempt %d: the hand-over memfd was read before the test caught it; re-executing again", attempt)
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
