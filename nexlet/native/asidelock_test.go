package native

import (
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// openHold holds every open of one directory (a fanotify permission event on its
// inode, which a rename keeps) until the test has looked around: removing a tree opens
// each of its directories to list it, so the test sees the removal from inside, at a
// point the kernel fixes, with no hook in the code under test.
type openHold struct {
	f    *os.File
	wg   sync.WaitGroup
	mu   sync.Mutex
	held []string // the path of the directory at each open held
}

// holdOpens holds the opens of dir; during runs at the first, with the path the
// directory has then, while the opener waits.
func holdOpens(t *testing.T, dir string, during func(path string)) *openHold {
	t.Helper()
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_CONTENT|unix.FAN_CLOEXEC|unix.FAN_NONBLOCK, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_LARGEFILE)
	if err != nil {
		t.Fatalf("fanotify: %v", err)
	}
	if err := unix.FanotifyMark(fd, unix.FAN_MARK_ADD, unix.FAN_OPEN_PERM|unix.FAN_ONDIR, unix.AT_FDCWD, dir); err != nil {
		unix.Close(fd)
		t.Fatalf("fanotify mark %s: %v", dir, err)
	}
	h := &openHold{f: os.NewFile(uintptr(fd), "fanotify")}
	h.wg.Go(func() {
		buf := make([]byte, 4096)
		for {
			n, err := h.f.Read(buf)
			if err != nil {
				return // closed by stop
			}
			for b := buf[:n]; len(b) >= int(unsafe.Sizeof(unix.FanotifyEventMetadata{})); {
				evLen := binary.NativeEndian.Uint32(b[0:4])
				evFd := int32(binary.NativeEndian.Uint32(b[16:20]))
				if int(evLen) < int(unsafe.Sizeof(unix.FanotifyEventMetadata{})) || int(evLen) > len(b) {
					break
				}
				b = b[evLen:]
				if evFd < 0 {
					continue
				}
				path, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(evFd)))
				h.mu.Lock()
				h.held = append(h.held, path)
				first := len(h.held) == 1
				h.mu.Unlock()
				if first {
					during(path)
				}
				var resp [8]byte
				binary.NativeEndian.PutUint32(resp[0:4], uint32(evFd))
				binary.NativeEndian.PutUint32(resp[4:8], unix.FAN_ALLOW)
				if _, err := h.f.Write(resp[:]); err != nil {
					t.Errorf("fanotify response: %v", err)
				}
				unix.Close(int(evFd))
			}
		}
	})
	t.Cleanup(h.stop)
	return h
}

// stop lets every open go (the kernel allows what is pending when the group closes) and
// returns the paths of the opens held.
func (h *openHold) stop() {
	_ = h.f.Close()
	h.wg.Wait()
}

// waitHeldDirGone waits (waitLong at most) for the directory of the first open held to
// be gone: the removal went on once the hold let it.
func (h *openHold) waitHeldDirGone() bool {
	return testkit.WaitFor(waitLong, func() bool {
		held := h.paths()
		if len(held) == 0 {
			return false
		}
		_, err := os.Lstat(filepath.Dir(held[0]))
		return errors.Is(err, fs.ErrNotExist)
	})
}

func (h *openHold) paths() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.held...)
}

// leftoverTreeOf makes a tree of uid's in /tmp as a workload leaves one: a secret at
// its top and files many files below (each one more entry its removal unlinks).
func leftoverTreeOf(t *testing.T, uid uint32, files int) (tree, secret string) {
	t.Helper()
	tree, err := os.MkdirTemp("/tmp", "nexd-test-left-tree-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(tree) })
	many := filepath.Join(tree, "many")
	if err := os.Mkdir(many, 0o700); err != nil {
		t.Fatal(err)
	}
	secret = "secret-" + strconv.Itoa(os.Getpid())
	paths := []string{tree, many, filepath.Join(tree, "secret")}
	if err := os.WriteFile(paths[2], []byte(secret), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := range files {
		p := filepath.Join(many, strconv.Itoa(i))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	for _, p := range paths {
		if err := os.Chown(p, int(uid), int(uid)); err != nil {
			t.Fatal(err)
		}
	}
	return tree, secret
}

// lockFree reports whether another process (another nexlet of the host) could take the
// lease lock now: a lock of its own open file, not waited for.
func lockFree(t *testing.T, us *users) bool {
	f, err := os.OpenFile(filepath.Join(us.pol.LeaseDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Error(err)
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return false
	}
	return true
}

// readAs has a process of uid (the uid's next holder) try to read each path; it
// returns what it could read.
func readAs(t *testing.T, uid uint32, paths ...string) []string {
	t.Helper()
	var read []string
	for _, p := range paths {
		cmd := exec.Command("cat", p)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Errorf("cat %s as uid %d: %v", p, uid, err)
			continue
		}
		if err == nil {
			read = append(read, p+": "+strings.TrimSpace(string(out)))
		}
	}
	return read
}

// checkAside is what both tests check at the removal of a tree (at path) of uid's
// whose home was tree: the lease lock is free, the tree is no longer where it was but
// in a directory of root's (0700), and the uid can read it at neither place.
func checkAside(t *testing.T, us *users, uid uint32, tree, path string) {
	if !lockFree(t, us) {
		t.Errorf("the lease lock is held while %s is removed: every deploy of the host waits for the removal", path)
	}
	if _, err := os.Lstat(tree); err == nil {
		t.Errorf("%s is still at its path while it is removed", tree)
	}
	if !strings.HasPrefix(filepath.Base(filepath.Dir(path)), asideName) {
		t.Errorf("removed at %s, not in an aside directory", path)
	} else if st, err := os.Lstat(filepath.Dir(path)); err != nil || st.Mode().Perm() != 0o700 || st.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Errorf("moved into %s, not a directory of root's with mode 0700: %v", filepath.Dir(path), err)
	}
	if got := readAs(t, uid, filepath.Join(tree, "secret"), filepath.Join(path, "secret")); len(got) > 0 {
		t.Errorf("uid %d read what its last holder left while it was removed: %q", uid, got)
	}
}

// TestStaleLeaseRemovesTreesAfterTheLock: a lease whose holder is gone unreleased is
// taken over with the leftovers of its uid removed first (TestAttackLeftoversOfAStaleLease);
// that removal was done under the host-wide lease lock, which every deploy's claim of a
// uid waits for, and a tree a workload left in /tmp takes as long to remove as it has
// entries: a tenant's workload could hold every deploy on the host that long. Then the
// tree was moved out of the uid's reach under the lock (into root's 0700 directory)
// before the uid was leased, and removed after the lock, but still by the lease call:
// the deploy that took the uid waited for it. Now the nexlet's own goroutine removes it
// (handAside). The removal's open of the tree is held (fanotify) while the test looks:
// the lock is free, the lease is its new owner's, the lease call has answered, and the
// uid reads the old holder's secret neither where it was nor where it went; once let
// go, the tree and the directory it went into are removed. Before, the lease call was
// still in that open (the test waits 30 s for its answer and fails).
func TestStaleLeaseRemovesTreesAfterTheLock(t *testing.T) {
	needRoot(t)
	us, uid := staleLeaseUsers(t)
	t.Cleanup(us.stopPool) // after the hold's own clean-up, which lets the removal go on
	tree, _ := leftoverTreeOf(t, uid, 2000)
	owner := t.TempDir()
	answered := make(chan struct{})
	var ids []ident
	var err error
	h := holdOpens(t, tree, func(path string) {
		checkAside(t, us, uid, tree, path)
		select {
		case <-answered:
		case <-time.After(waitLong):
			t.Errorf("the lease of uid %d did not answer within %s while the removal of its last holder's tree was held: the deploy waits for the removal", uid, waitLong)
		}
		if b, err := os.ReadFile(us.leasePath(uid)); err != nil || leaseOwner(b) != owner {
			t.Errorf("lease of uid %d at the tree's removal: %q %v, want %s's: the uid is leased after the removal", uid, b, err, owner)
		}
	})
	go func() {
		defer close(answered)
		ids, err = us.leaseFreshN(owner, 1)
	}()
	<-answered
	if err != nil || len(ids) != 1 || ids[0].uid != uid {
		t.Fatalf("leased %v: %v, want uid %d (its stale lease taken over)", ids, err, uid)
	}
	removed := h.waitHeldDirGone()
	h.stop()
	held := h.paths()
	t.Logf("stale lease of uid %d taken over: %v; the removal opened the tree at %q", uid, ids, held)
	if len(held) == 0 {
		t.Fatal("the tree was never opened for its removal")
	}
	if !removed {
		t.Errorf("the aside directory %s is left behind %s after the lease", filepath.Dir(held[0]), waitLong)
	}
	if _, err := os.Lstat(tree); err == nil {
		t.Errorf("%s survived", tree)
	}
}

// TestSweepStaleRemovesTreesAfterTheLock: a nexlet's start frees the stale leases
// nexlets that are gone left (sweepStale), with their uids' leftovers; those it removed
// under the lease lock, as a stale lease's reuse did (above). Now the trees are moved
// aside under it and removed after, by the nexlet's own goroutine (handAside): removed
// by the sweep itself, after the lock, they held the pool's first refill (the sweep
// runs before it) and the nexlet's stop as long as they took. While the removal's open
// of the tree is held, the sweep has returned, and the test's second nexlet (another
// users on the same lease directory) leases the freed uid; as that uid, the old
// holder's secret is read neither where it was nor where it went. Before the trees
// were moved aside, the lock was held there (the test takes it without waiting, or
// would wait for ever) and the uid was still leased; before their removal was handed
// off, the sweep had not returned (the test waits 30 s for it and fails).
func TestSweepStaleRemovesTreesAfterTheLock(t *testing.T) {
	needRoot(t)
	uid := testkit.UIDs(t, 1)
	leases := t.TempDir()
	us := testUsers(t, UserPolicy{LeaseDir: leases, UIDMin: uid, UIDMax: uid})
	t.Cleanup(us.stopPool) // after the hold's own clean-up, which lets the removal go on
	other := testUsers(t, UserPolicy{LeaseDir: leases, UIDMin: uid, UIDMax: uid})
	other.asideRoots = us.asideRoots // the same host's
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	if err := writeLease(us.leasePath(uid), "/proc/"+strconv.Itoa(gone.Process.Pid)); err != nil {
		t.Fatal(err)
	}
	tree, _ := leftoverTreeOf(t, uid, 2000)
	var leasedMeanwhile []ident
	swept := make(chan struct{})
	var nl int
	h := holdOpens(t, tree, func(path string) {
		free := lockFree(t, us)
		checkAside(t, us, uid, tree, path)
		select {
		case <-swept:
		case <-time.After(waitLong):
			t.Errorf("the sweep of stale leases did not return within %s while the removal of a freed uid's tree was held: the pool's first refill waits for the removal", waitLong)
		}
		if !free {
			return // leasing would wait for the removal that waits for this
		}
		ids, err := other.leaseFreshN(t.TempDir(), 1)
		if err != nil {
			t.Errorf("another nexlet leases no uid during the removal: %v", err)
			return
		}
		leasedMeanwhile = ids
		if got := readAs(t, ids[0].uid, filepath.Join(tree, "secret"), filepath.Join(path, "secret")); len(got) > 0 {
			t.Errorf("the uid's new holder read what its last holder left: %q", got)
		}
	})
	var err error
	go func() {
		defer close(swept)
		nl, _, err = us.sweepStale()
	}()
	<-swept
	removed := h.waitHeldDirGone()
	h.stop()
	held := h.paths()
	t.Logf("sweep freed %d stale leases (err %v); the removal opened the tree at %q; leased meanwhile: %v", nl, err, held, leasedMeanwhile)
	if err != nil {
		t.Fatal(err)
	}
	if nl != 1 {
		t.Errorf("sweep freed %d leases, want 1", nl)
	}
	if len(held) == 0 {
		t.Fatal("the tree was never opened for its removal")
	}
	if len(leasedMeanwhile) != 1 || leasedMeanwhile[0].uid != uid {
		t.Errorf("leased during the removal: %v, want uid %d", leasedMeanwhile, uid)
	}
	if _, err := os.Lstat(tree); err == nil {
		t.Errorf("%s survived", tree)
	}
	if !removed {
		t.Errorf("the aside directory %s is left behind %s after the sweep", filepath.Dir(held[0]), waitLong)
	}
}
