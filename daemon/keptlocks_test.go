package daemon

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestUnknownKeptLockNotInherited: an image of another version re-executed into this
// one may keep a lock under a key this image does not know. It stays open (it is still
// this node's lock) but is close-on-exec from the first look at the kept locks, so the
// nexlets and workloads started after never hold it; before, it passed to them all.
func TestUnknownKeptLockNotInherited(t *testing.T) {
	fd, err := unix.Open(filepath.Join(t.TempDir(), "future.lock"), unix.O_CREAT|unix.O_RDWR, 0o600) // no O_CLOEXEC, as kept
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	t.Setenv(envDirLocks, "future_dir="+strconv.Itoa(fd))
	d := &daemon{}
	if _, ok := d.inheritedLock("state_dir"); ok {
		t.Fatal("state_dir reported kept")
	}
	if _, ok := os.LookupEnv(envDirLocks); ok {
		t.Errorf("%s still in the environment", envDirLocks)
	}
	out, err := exec.Command("/bin/sh", "-c", "ls /proc/self/fd").Output()
	if err != nil {
		t.Fatal(err)
	}
	for f := range strings.FieldsSeq(string(out)) {
		if f == strconv.Itoa(fd) {
			t.Fatalf("a child inherits the unknown kept lock (fd %d): %q", fd, out)
		}
	}
}
