package e2e

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestNexctlTopPlain runs the real `nexctl top` without a terminal: one plain snapshot
// with the running workload's state and memory limit, locally and over NATS.
func TestNexctlTopPlain(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{})
	st := n.waitReady(t)
	w := n.runWorkload(t, "--name", "sleeper", "--", "/bin/sleep", "1000")
	out := n.mustCtl(t, "top", "--interval", "200ms", "--sort", "mem")
	if !strings.Contains(out, w.ID) || !strings.Contains(out, "sleeper") || !strings.Contains(out, "running") || strings.Contains(out, "\x1b") {
		t.Errorf("top (local):\n%q", out)
	}
	out = n.mustCtl(t, "top", "--node", st.Name, "--interval", "200ms")
	if !strings.Contains(out, w.ID) || !strings.Contains(out, "node "+st.NodeID[:12]) {
		t.Errorf("top --node:\n%s", out)
	}
	// Over NATS the node reads the workload's cgroup too: CPU and memory against the
	// default limit, as locally (where this host has cgroups for it).
	if n.cgroup == "" {
		t.Log("no cgroup root on this host: CPU and memory not checked")
		return
	}
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, w.ID) {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 9 {
			t.Fatalf("top --node row %q", line)
		}
		if _, err := strconv.ParseFloat(f[4], 64); err != nil || !strings.Contains(line, "/ 512.0 MiB") {
			t.Errorf("top --node row lacks CPU or memory against the 512M default limit: %q", line)
		}
		return
	}
	t.Errorf("no row for %s:\n%s", w.ID, out)
}

// openPTY opens a pseudo-terminal pair: what nexctl gets as its terminal (tty), and the
// side the test reads it from (ptm).
func openPTY(t *testing.T) (ptm, tty *os.File) {
	t.Helper()
	// Non-blocking, so that Go's poller owns it and Close ends a read in progress.
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	ptm = os.NewFile(uintptr(fd), "/dev/ptmx")
	t.Cleanup(func() { ptm.Close() })
	if err := unix.IoctlSetPointerInt(int(ptm.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(int(ptm.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("ptsname: %v", err)
	}
	tty, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("open /dev/pts/%d: %v", n, err)
	}
	t.Cleanup(func() { tty.Close() })
	return ptm, tty
}

// TestNexctlTopInterruptedAfterPartial: an interactive `nexctl top` (its stdout a
// terminal) that showed a PARTIAL snapshot (the node's echo nexlet frozen) and is then
// interrupted with Ctrl-C (SIGINT) exits 1 saying so, as workload list does for a
// partial list; interrupted after whole snapshots it exits 0. Before, it exited 0 either
// way.
func TestNexctlTopInterruptedAfterPartial(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n, _ := echoNode(t, s)
	n.runWorkload(t, "--name", "sleeper", "--", "/bin/sleep", "600")
	topUntil := func(want string) (string, string, int) {
		t.Helper()
		ptm, tty := openPTY(t)
		var screen, stderr testkit.Buffer
		copied := make(chan struct{})
		go func() { defer close(copied); _, _ = io.Copy(&screen, ptm) }()
		t.Cleanup(func() { ptm.Close(); <-copied }) // the copy ends with ptm
		cmd := exec.Command(nexctlBin(t), "--control-socket", n.socket, "top", "--interval", "200ms")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
		testkit.EventuallyWithin(t, 30*time.Second, "top shows "+want, func() bool { return screen.Contains(want) })
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatalf("SIGINT: %v\nscreen: %q\nstderr: %s", err, screen.String(), stderr.String())
		}
		select {
		case err := <-exited:
			exited <- err
		case <-time.After(20 * time.Second):
			t.Fatalf("top did not end on SIGINT\nscreen: %q\nstderr: %s", screen.String(), stderr.String())
		}
		return screen.String(), stderr.String(), cmd.ProcessState.ExitCode()
	}
	screen, errOut, code := topUntil("sleeper")
	if code != 0 || strings.Contains(screen, "PARTIAL") {
		t.Fatalf("top interrupted after whole snapshots: exit %d\nscreen: %q\nstderr: %s", code, screen, errOut)
	}
	n.freezeEcho(t)
	screen, errOut, code = topUntil("PARTIAL: ")
	if code != 1 || !strings.Contains(errOut, "snapshot(s) were partial") {
		t.Fatalf("top interrupted after a partial snapshot: exit %d\nscreen: %q\nstderr: %s", code, screen, errOut)
	}
}
