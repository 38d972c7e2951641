package daemon

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// A real small filesystem (tmpfs) filled up: a deploy's check names the directory and
// stops the bids at once; the watch's loop lets them go again within about a second of
// the space coming back. On the test's own temp dir everything passes.
func TestDiskWatch(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	if err := newDiskWatch(quiet, map[string]string{"state directory": "", "temp dir": t.TempDir()}).placeCheck(); err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	dir := smallTmpfs(t)
	w := newDiskWatch(quiet, map[string]string{"state directory": dir})
	if err := w.placeCheck(); err != nil {
		t.Fatalf("empty 8 MiB tmpfs: %v", err)
	}
	if err := w.bidRefusal(); err != nil {
		t.Fatalf("bids refused on an empty tmpfs: %v", err)
	}
	if err := os.WriteFile(dir+"/fill", make([]byte, 5<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	err := w.placeCheck()
	if err == nil || !strings.Contains(err.Error(), "state directory") || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("3 MiB free: %v", err)
	}
	if err := w.bidRefusal(); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("bids not refused once a deploy found the disk full: %v", err)
	}
	if st := w.status(); st == nil || st.State != "unwritable" || !strings.Contains(st.Detail, "state directory") {
		t.Fatalf("status %+v, want unwritable naming the state directory", st)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.loop(ctx) }()
	defer func() { cancel(); <-done }()
	if err := os.Remove(dir + "/fill"); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	testkit.EventuallyWithin(t, 10*time.Second, "bids again once space is back", func() bool { return w.bidRefusal() == nil })
	t.Logf("bidding again %s after the space was freed", time.Since(freed).Round(time.Millisecond))
	if st := w.status(); st == nil || st.State != "ok" {
		t.Errorf("status %+v once space is back, want ok", st)
	}
}

// A directory with space that refuses writes (a read-only remount): the loop's write
// finds it, and a deploy's check, which looks only at the space, keeps the refusal
// rather than ending it.
func TestDiskWatchDeployKeepsWriteFailure(t *testing.T) {
	dir := smallTmpfs(t)
	w := newDiskWatch(slog.New(slog.DiscardHandler), map[string]string{"state directory": dir})
	if err := w.check(); err != nil {
		t.Fatalf("writable tmpfs: %v", err)
	}
	if out, err := exec.Command("mount", "-o", "remount,ro", dir).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v: %s", err, out)
	}
	if err := w.check(); err == nil || !strings.Contains(err.Error(), "cannot be written") {
		t.Fatalf("read-only tmpfs: %v, want cannot be written", err)
	}
	if err := w.placeCheck(); err == nil || !strings.Contains(err.Error(), "cannot be written") {
		t.Fatalf("a deploy's check on the read-only tmpfs: %v, want the write's refusal kept", err)
	}
	if err := w.bidRefusal(); err == nil {
		t.Fatal("bids allowed again after a deploy's check of a directory that refuses writes")
	}
}

// smallTmpfs mounts an 8 MiB tmpfs for the test (skipped without root).
func smallTmpfs(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "nexd-test", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}
