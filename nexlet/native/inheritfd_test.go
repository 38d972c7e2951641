package native

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackWorkloadGetsNoInheritedDescriptor: the nexlet's process holds a descriptor
// it inherited without close-on-exec, as a launcher leaves one (a shell's or a CI
// runner's pipe; the tools that ran this review's tests left two, fds 10 and 251, and
// an in-process test nexlet's workloads held both), here a root-only file of the
// launcher's. nexd marks what it inherited close-on-exec before it starts a nexlet, but
// a native nexlet started otherwise did not: a workload, its own dynamic uid, read the
// file through the descriptor its fork outside the v1 fork pool (no cgroups here)
// handed it. Now the nexlet marks every descriptor it inherited before its first fork.
// Not parallel: the descriptor is the whole process's.
func TestAttackWorkloadGetsNoInheritedDescriptor(t *testing.T) {
	needRoot(t)
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	secret := "launcher-secret-" + hex.EncodeToString(b)
	path := filepath.Join(t.TempDir(), "launcher.secret")
	if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(f.Fd())) // dup: without close-on-exec, as inherited
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })

	lo := testkit.UIDs(t, 1)
	fn := newFakeNode(t)
	fn.startNexlet(Config{Users: UserPolicy{UIDMin: lo, UIDMax: lo, LeaseDir: t.TempDir()}})
	n := strconv.Itoa(fd)
	fn.mustStart("thief", startReq(protocol.LifecycleJob, "thief", map[string]any{
		"uri": script(t, "id -u; cat <&"+n+" 2>&1 || echo no fd "+n+"; echo done")}, fn.creds()))
	fn.waitLog("thief", "stdout", "done")
	for _, l := range fn.logLines("thief", "stdout") {
		if strings.Contains(l, secret) {
			t.Errorf("a workload read the nexlet's inherited descriptor %d (a root-only file): %q", fd, l)
		}
	}
	if uid := fn.logLines("thief", "stdout")[0]; uid != strconv.FormatUint(uint64(lo), 10) {
		t.Errorf("the workload ran as %q, want its dynamic uid %d", uid, lo)
	}
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("the inherited descriptor %d is not close-on-exec after the nexlet's start: flags %#x, %v", fd, fl, err)
	}
}
