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

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// binaryRSS sums the resident kB of pid's mappings of its own executable.
func binaryRSS(t *testing.T, pid int) int {
	t.Helper()
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps"))
	if err != nil {
		t.Fatal(err)
	}
	kb, ours := 0, false
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
		case !strings.HasSuffix(f[0], ":"):
			ours = len(f) >= 6 && strings.Join(f[5:], " ") == exe
		case ours && f[0] == "Rss:":
			v, _ := strconv.Atoi(f[1])
			kb += v
		}
	}
	return kb
}

// readAfresh copies bin and drops the copy from the page cache, so that its exec reads
// it in as after a reboot or a package's install. The build's own output sits in the
// page cache in 2 MiB folios, which the kernel maps back whole on any fault: dropped or
// not, such a binary's text is resident nearly whole.
func readAfresh(t *testing.T, bin string) string {
	t.Helper()
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "nexd")
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil { // dirty pages cannot be dropped
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestStartupPagesDropped: a node unmaps its binary's start-up pages once ready (nexd)
// and registered (the native nexlet), so both hold less of the binary resident than a
// node started alike with keep_startup_pages, and a deploy (whose code faults back
// from the page cache) still runs.
func TestStartupPagesDropped(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	bin := readAfresh(t, nexdBin(t))
	debug := []string{"--logger.level", "debug"}
	dropped := startNode(t, nodeOpts{bin: bin, extra: debug})
	kept := startNode(t, nodeOpts{bin: bin, extra: append(debug, "--keep-startup-pages")})
	dropped.waitReady(t)
	kept.waitReady(t)
	dropped.waitNative(t)
	kept.waitNative(t)
	testkit.EventuallyWithin(t, 30*time.Second, "both drops logged", func() bool {
		return strings.Count(dropped.out.String(), `msg="start-up pages dropped"`) == 2
	})
	if strings.Contains(kept.out.String(), "start-up pages") {
		t.Errorf("keep_startup_pages: the node dropped anyway\n%s", kept.out.String())
	}
	rss := func(n *node) (int, int) {
		pid := nexletPID(n.cmd.Process.Pid)
		if pid == 0 {
			t.Fatal("native nexlet process not found")
		}
		return binaryRSS(t, n.cmd.Process.Pid), binaryRSS(t, pid)
	}
	dNexd, dNexlet := rss(dropped)
	kNexd, kNexlet := rss(kept)
	t.Logf("binary resident, kB: nexd %d (kept: %d), nexlet %d (kept: %d)", dNexd, kNexd, dNexlet, kNexlet)
	// Idle, the dropped node refaults what it runs again (the collector's reads of
	// pclntab); measured, it holds 4-5 MB less of the binary in each process.
	if dNexd+dNexlet > (kNexd+kNexlet)*85/100 {
		t.Errorf("binary resident after the drop %d kB, kept %d kB: want 15%% less at least", dNexd+dNexlet, kNexd+kNexlet)
	}
	marker := fmt.Sprintf("nexd-e2e-coldpages-%d", time.Now().UnixNano())
	dropped.runWorkloads(t, 1, func(int) []string {
		return []string{"--bids", "1", "--name", "cold", "--", "/bin/sh", "-c", "sleep 600; :", marker}
	})
	testkit.EventuallyWithin(t, 30*time.Second, "the workload running", func() bool { return countProcs(marker) == 1 })
	for _, n := range []*node{dropped, kept} {
		n.signal(t, syscall.SIGTERM)
		if code := n.wait(t, 90*time.Second); code != 0 {
			t.Errorf("nexd exited %d\n%s", code, n.out.String())
		}
	}
	if c := countProcs(marker); c != 0 {
		t.Errorf("%d workload processes survived the stop", c)
	}
}
