package e2e

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestControlSocketDirs: `nexd --control-socket <tmp>/missing/dir/nexd.sock` made both
// missing directories (mkdir -p) and served there; an operator's typo or a mount not
// there yet went unnoticed. Now nexd refuses to start, naming the missing directory,
// and makes nothing; the socket's own directory alone it still makes (0755, as
// systemd's RuntimeDirectory= makes /run/nex), saying so.
func TestControlSocketDirs(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	base := t.TempDir()
	missing := filepath.Join(base, "missing")
	p := startNexd(t, nexdOpts{args: []string{"--state-dir", t.TempDir(), "--control-socket", filepath.Join(missing, "dir", "nexd.sock"),
		"--node-name", "e2e", "--disable-native-start"}, env: []string{"NEXD_EMBEDDED_NATS_PORT=-1"}})
	if code := p.wait(t, time.Minute); code == 0 {
		t.Fatalf("nexd started with its control socket under a missing directory:\n%s", p.out.String())
	}
	if want := "directory " + missing + " does not exist"; !strings.Contains(p.out.String(), want) {
		t.Errorf("nexd's error does not say %q:\n%s", want, p.out.String())
	}
	if _, err := os.Lstat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("nexd made %s (%v)", missing, err)
	}

	// One level missing: made, 0755, and said.
	own := filepath.Join(base, "run")
	n := startNode(t, nodeOpts{extra: []string{"--control-socket", filepath.Join(own, "nexd.sock")}})
	n.socket = filepath.Join(own, "nexd.sock")
	n.waitReady(t)
	fi, err := os.Stat(own)
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("the socket's directory: %v, %v; want made 0755", fi, err)
	}
	if !strings.Contains(n.out.String(), "made the control socket's directory") {
		t.Errorf("nexd did not say it made %s:\n%s", own, n.out.String())
	}
}
