package daemon

import (
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// A real small filesystem (tmpfs) filled up: the check names the directory; on the
// test's own temp dir it passes.
func TestDiskSpace(t *testing.T) {
	if err := diskSpace(slog.New(slog.DiscardHandler), map[string]string{"state directory": "", "temp dir": t.TempDir()})(); err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "nexd-test", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	if err := diskSpace(slog.New(slog.DiscardHandler), map[string]string{"state directory": dir})(); err != nil {
		t.Fatalf("empty 8 MiB tmpfs: %v", err)
	}
	if err := os.WriteFile(dir+"/fill", make([]byte, 5<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	err := diskSpace(slog.New(slog.DiscardHandler), map[string]string{"state directory": dir})()
	if err == nil || !strings.Contains(err.Error(), "state directory") || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("3 MiB free: %v", err)
	}
}
