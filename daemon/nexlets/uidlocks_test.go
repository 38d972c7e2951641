package nexlets

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet/native"
)

// startUIDKeeper serves a uid lock socket of its own, admitting the processes nameOf
// names; stopped when the test ends.
func startUIDKeeper(t *testing.T, nameOf func(pid int) string) (*uidKeeper, string) {
	t.Helper()
	path := UIDLockSocketPath(t.TempDir())
	ln, err := listenPrivate(path, "unixpacket")
	if err != nil {
		t.Fatal(err)
	}
	k := newUIDKeeper(ln, nameOf, slog.New(slog.DiscardHandler))
	t.Cleanup(k.stop)
	return k, path
}

// dialKeeper connects as a nexlet and reads nexd's hand-over: the uids and copies it
// gave, up to its END.
func dialKeeper(t *testing.T, path string) (*net.UnixConn, []uint32, []*os.File) {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	var uids []uint32
	var files []*os.File
	for {
		op, u, f, err := native.ReadUIDLocks(c)
		if err != nil {
			t.Fatalf("hand-over: %v", err)
		}
		if op == native.UIDLockEnd {
			return c, uids, files
		}
		uids, files = append(uids, u...), append(files, f...)
	}
}

// lockBusy does systemd's check on path's file, open as f: whether another open file
// holds its lock (flock conflicts between open files, in one process too).
func lockBusy(t *testing.T, f *os.File) bool {
	t.Helper()
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return true
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	return false
}

// TestUIDKeeperHoldsADeadNexletsLocks: on a real socket, with the test process playing
// the native nexlet. Its lock on a uid's file, sent to nexd (HOLD), stays held by nexd's
// copy once the nexlet's own descriptor and connection are gone (its kill): another
// open file of the lock file cannot take it. The next nexlet gets the copy at its
// connection (the same file), unlinks the file, closes it and says DROP: nexd's copy
// goes, and the lock is free. A copy whose file was unlinked without a DROP (a nexlet
// killed between the two) is not handed over, and is forgotten.
func TestUIDKeeperHoldsADeadNexletsLocks(t *testing.T) {
	self := os.Getpid()
	k, path := startUIDKeeper(t, func(pid int) string {
		if pid == self {
			return "native"
		}
		return ""
	})
	sd := t.TempDir()
	lockFile := func(uid uint32) (string, *os.File) {
		p := filepath.Join(sd, strconv.Itoa(int(uid)))
		f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			t.Fatal(err)
		}
		return p, f
	}
	const uid, other = 2000500, 2000501
	p, mine := lockFile(uid)
	p2, mine2 := lockFile(other)
	c, uids, _ := dialKeeper(t, path)
	if len(uids) != 0 {
		t.Fatalf("a first nexlet was handed %v", uids)
	}
	if err := native.SendUIDLocks(c, native.UIDLockHold, []uint32{uid, other}, []*os.File{mine, mine2}); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "nexd keeps the copies", func() bool { return k.count() == 2 })
	// The nexlet dies: its descriptors close.
	c.Close()
	mine.Close()
	mine2.Close()
	probe, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	if !lockBusy(t, probe) {
		t.Fatal("the dead nexlet's lock is free: nexd's copy does not hold it")
	}
	// other's file is released (unlinked) without a DROP: a nexlet killed in between.
	if err := os.Remove(p2); err != nil {
		t.Fatal(err)
	}

	c2, uids, files := dialKeeper(t, path)
	defer c2.Close()
	if len(uids) != 1 || uids[0] != uid || !native.SameFile(files[0], probe) {
		t.Fatalf("the next nexlet was handed %v, want only %d's lock file", uids, uid)
	}
	if k.count() != 1 {
		t.Errorf("nexd keeps %d copies, want 1 (the unlinked one forgotten)", k.count())
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	files[0].Close()
	if !lockBusy(t, probe) {
		t.Fatal("the lock is free before the DROP")
	}
	if err := native.SendUIDLocks(c2, native.UIDLockDrop, []uint32{uid}, nil); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "nexd's copy closed at the DROP", func() bool { return k.count() == 0 && !lockBusy(t, probe) })
}

// TestAttackUIDLockSocketRefusesOtherProcesses: a process that is not a native nexlet
// of this nexd (here the test process, which nameOf does not know: a root workload, or
// another root process) connects to the uid lock socket. It is handed no copy of the
// locks nexd keeps (with one, it could let a running workload's uid lock go with
// LOCK_UN, for systemd to give the uid away), and its connection is closed.
func TestAttackUIDLockSocketRefusesOtherProcesses(t *testing.T) {
	k, path := startUIDKeeper(t, func(int) string { return "" })
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "2000502"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	k.apply("native", native.UIDLockHold, []uint32{2000502}, []*os.File{f})
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	op, uids, files, err := native.ReadUIDLocks(c)
	if err == nil {
		t.Fatalf("a process not a nexlet was sent %q %v with %d descriptors", op, uids, len(files))
	}
	if k.count() != 1 {
		t.Errorf("nexd keeps %d copies, want its 1", k.count())
	}
}

// BenchmarkUIDKeeperHoldDrop: what a leased uid's lock costs on nexd's socket, a HOLD
// as the nexlet takes it and a DROP at its release (the nexlet's two sends; nexd's reads
// run beside them), for one lock file.
func BenchmarkUIDKeeperHoldDrop(b *testing.B) {
	self := os.Getpid()
	dir := b.TempDir()
	path := UIDLockSocketPath(dir)
	ln, err := listenPrivate(path, "unixpacket")
	if err != nil {
		b.Fatal(err)
	}
	k := newUIDKeeper(ln, func(pid int) string {
		if pid == self {
			return "native"
		}
		return ""
	}, slog.New(slog.DiscardHandler))
	defer k.stop()
	f, err := os.OpenFile(filepath.Join(dir, "2000503"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if op, _, _, err := native.ReadUIDLocks(c); err != nil || op != native.UIDLockEnd {
		b.Fatalf("hand-over: %q %v", op, err)
	}
	uid := []uint32{2000503}
	for b.Loop() {
		if err := native.SendUIDLocks(c, native.UIDLockHold, uid, []*os.File{f}); err != nil {
			b.Fatal(err)
		}
		if err := native.SendUIDLocks(c, native.UIDLockDrop, uid, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// TestUIDKeeperHandOverBesideADrop: a nexlet that connects again while nexd still reads
// its last connection's messages has its hand-over sent beside them: a DROP read there
// closes nexd's copy of that lock. The hand-over sent that very descriptor, closed
// under it (EBADF: the hand-over failed and the connection was dropped; or, its number
// reused by then, another of nexd's files sent to the nexlet). It sends duplicates now.
func TestUIDKeeperHandOverBesideADrop(t *testing.T) {
	k := &uidKeeper{log: slog.New(slog.DiscardHandler), held: map[string]map[uint32]*os.File{}, conns: map[*net.UnixConn]bool{}}
	lock, err := os.Create(filepath.Join(t.TempDir(), "2000600"))
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	k.apply("native", native.UIDLockHold, []uint32{2000600}, []*os.File{lock})
	uids, files := k.copies("native")
	t.Cleanup(func() {
		for _, f := range files {
			f.Close()
		}
	})
	// The earlier connection's DROP, read between the hand-over's copies and its send.
	k.apply("native", native.UIDLockDrop, []uint32{2000600}, nil)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	nexd, nexlet := conn(fds[0]), conn(fds[1])
	if err := native.SendUIDLocks(nexd, native.UIDLockHold, uids, files); err != nil {
		t.Fatalf("hand-over beside a DROP: %v", err)
	}
	_, got, sent, err := native.ReadUIDLocks(nexlet)
	if err != nil || len(got) != 1 || len(sent) != 1 {
		t.Fatalf("the nexlet got %v %v (%v), want the lock's file", got, sent, err)
	}
	defer sent[0].Close()
	want, err := os.Stat(lock.Name()) // nexd's own copy (lock) is closed by the DROP
	if err != nil {
		t.Fatal(err)
	}
	if st, err := sent[0].Stat(); err != nil || !os.SameFile(st, want) {
		t.Fatalf("the nexlet got another file than the lock's: %v", err)
	}
}

// envDialPass makes the test binary a process that connects to the uid lock socket it
// names, passes the connection to its parent (descriptor 3, a Unix socket) and exits.
const envDialPass = "NEXD_TEST_UIDLOCK_DIAL_AND_PASS"

// TestUIDLockDialAndPass is that process's body (TestAttackUIDLockSocketPIDReused).
func TestUIDLockDialAndPass(t *testing.T) {
	path := os.Getenv(envDialPass)
	if path == "" {
		t.Skip("the connecting process of TestAttackUIDLockSocketPIDReused")
	}
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Sendmsg(3, []byte{1}, unix.UnixRights(int(f.Fd())), nil, 0); err != nil {
		t.Fatal(err)
	}
}

// TestAttackUIDLockSocketPIDReused: a root process connects to the uid lock socket,
// hands the connection to another process and exits; its pid then names a native
// nexlet (here nameOf names it once it exited, as a nexlet spawned with the reused pid
// would be named) while the connection waits to be admitted. Before, the pid alone was
// checked: the connection was handed nexd's copies of the locks, with which its holder
// could let a running workload's uid lock go (LOCK_UN). Now the process that connected
// must still be the one at that pid (its start time): refused, nothing handed.
func TestAttackUIDLockSocketPIDReused(t *testing.T) {
	var exited atomic.Int64
	k, path := startUIDKeeper(t, func(pid int) string {
		if int64(pid) == exited.Load() {
			return "native"
		}
		return ""
	})
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "2000504"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	k.apply("native", native.UIDLockHold, []uint32{2000504}, []*os.File{f})
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "parent"), os.NewFile(uintptr(fds[1]), "child")
	defer mine.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestUIDLockDialAndPass$", "-test.count=1")
	cmd.Env = append(os.Environ(), envDialPass+"="+path)
	cmd.ExtraFiles = []*os.File{theirs}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("connecting process: %v: %s", err, out)
	}
	theirs.Close()
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(int(mine.Fd()), make([]byte, 1), oob, 0)
	if err != nil {
		t.Fatal(err)
	}
	cms, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(cms) != 1 {
		t.Fatalf("no connection passed: %v", err)
	}
	passed, err := unix.ParseUnixRights(&cms[0])
	if err != nil || len(passed) != 1 {
		t.Fatalf("no connection passed: %v", err)
	}
	cf := os.NewFile(uintptr(passed[0]), "passed")
	fc, err := net.FileConn(cf)
	cf.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	exited.Store(int64(cmd.Process.Pid)) // its pid now "names a nexlet"
	op, uids, files, err := native.ReadUIDLocks(fc.(*net.UnixConn))
	if err == nil {
		t.Fatalf("a connection whose process exited was sent %q %v with %d descriptors", op, uids, len(files))
	}
}
