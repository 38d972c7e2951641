package native

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

// removeLeftovers removes what the dynamic uids in want still own once none of their
// processes runs: System V shared memory segments, message queues and semaphore sets
// (by owner or creator), and the entries they own in the shared directories where a
// workload leaves files that outlive it: POSIX shared memory and message queues (what
// systemd's RemoveIPC= cleans for a DynamicUser=), /tmp and /var/tmp (the unit's
// TemporaryFileSystem= gives them to all of its workloads together) and /run/lock
// (leftoverDirs), and its kernel keyrings (clearKeyrings), so that the next
// workload given one of these uids, another tenant's maybe, cannot read them as their
// owner. It returns the uids whose leftovers could not all be removed (they must stay
// leased), each with its error.
func removeLeftovers(proc string, want map[uint32]bool) map[uint32]error {
	failed, trees := moveLeftovers(proc, nil, want)
	for uid, err := range trees.remove(nil) {
		failed[uid] = errors.Join(failed[uid], err)
	}
	return failed
}

// moveLeftovers is removeLeftovers with the directories among the leftovers moved out
// of every uid's reach instead, into a directory of root's (mode 0700) beside them (in
// roots.of their shared directory), to be removed by trees.remove (or by the nexlet's
// goroutine: handAside): a release, a stale lease's reuse (leaseFrom) and the sweep of stale leases (sweepStale) run it
// under the host-wide lease lock, which every deploy's claim of a uid waits for, and a
// tree a workload left in /tmp takes as long to remove as it has entries (100,000
// files: 1.9 s here); a rename takes one step whatever the size. Once moved, the next holder of the uid cannot reach them, so the
// uid may be freed before they are gone (TestReleaseRemovesTreesAfterTheLock).
func moveLeftovers(proc string, roots asideRoots, want map[uint32]bool) (map[uint32]error, *leftoverTrees) {
	trees := &leftoverTrees{roots: roots}
	return trees.take(proc, want), trees
}

// take is moveLeftovers into t: the trees are added to those t holds, into the same
// directories of root's.
func (t *leftoverTrees) take(proc string, want map[uint32]bool) map[uint32]error {
	failed := map[uint32]error{}
	fail := func(uid uint32, err error) { failed[uid] = errors.Join(failed[uid], err) }
	for _, t := range [...]struct{ table, id string }{{"shm", "shmid"}, {"msg", "msqid"}, {"sem", "semid"}} {
		rows, err := sysvOwned(filepath.Join(proc, "sysvipc", t.table), t.id, want)
		if err != nil {
			for uid := range want {
				fail(uid, err)
			}
			continue
		}
		for id, uid := range rows {
			if err := sysvRemove(t.table, id); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.EIDRM) {
				fail(uid, fmt.Errorf("dynamic uid %d: System V %s %d: %w", uid, t.table, id, err))
			}
		}
	}
	for _, uid := range keyUsers(proc, want) {
		if err := clearKeyrings(uid); err != nil {
			fail(uid, fmt.Errorf("dynamic uid %d: %w", uid, err))
		}
	}
	for _, dir := range leftoverDirs() {
		// Names only, each stat'ed relative to the open directory: a release batch reads
		// every entry of a host's /tmp (177 here), and an os.DirEntry, a joined path and
		// an os.FileInfo for each were most of what it allocated.
		d, err := os.Open(dir)
		if err != nil {
			continue // absent here (no /dev/mqueue mounted, say): nothing can be left in it
		}
		names, err := d.Readdirnames(-1)
		if err != nil {
			d.Close()
			continue
		}
		dfd := int(d.Fd())
		for _, name := range names {
			var st unix.Stat_t
			if unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || !want[st.Uid] {
				continue
			}
			p := filepath.Join(dir, name)
			if st.Mode&unix.S_IFMT == unix.S_IFDIR && t.move(dir, name, st.Uid) {
				continue
			}
			// RemoveAll opens nothing through a symlink, so a planted link takes
			// nothing else with it.
			if err := os.RemoveAll(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				fail(st.Uid, fmt.Errorf("dynamic uid %d: leftover %s: %w", st.Uid, p, err))
			}
		}
		d.Close()
	}
	return failed
}

// leftoverTrees are leftover directories moved aside by moveLeftovers, each into a
// directory of root's made beside it (mode 0700: no other uid can reach into it), in
// roots.of its shared directory.
type leftoverTrees struct {
	roots asideRoots
	aside map[string]string // a shared directory (/tmp) -> its directory of root's
	trees []leftoverTree
}

type leftoverTree struct {
	path string
	uid  uint32
}

// move renames dir/name into dir's directory of root's (made at the first); false when
// it could not (that directory not made, a mount point, another file system, a test's
// roots without dir): the caller removes it in place.
func (t *leftoverTrees) move(dir, name string, uid uint32) bool {
	aside, ok := t.aside[dir]
	if !ok {
		root := t.roots.of(dir)
		if root == "" {
			return false
		}
		var err error
		if aside, err = os.MkdirTemp(root, asidePrefix()); err != nil {
			return false
		}
		if t.aside == nil {
			t.aside = map[string]string{}
		}
		t.aside[dir] = aside
	}
	to := filepath.Join(aside, name)
	if err := os.Rename(filepath.Join(dir, name), to); err != nil {
		return false
	}
	t.trees = append(t.trees, leftoverTree{path: to, uid: uid})
	return true
}

// leftoverDirs are the shared directories a workload's leftovers are looked for in,
// each once by its real path: /run/lock is every user's (1777) on Debian and Ubuntu,
// and stays writable under nexd.service as /run does, with /var/lock a link to it
// (before, what a workload left there was read by the next holder of its uid:
// TestAttackLeftoversOfAReusedUID). Absent ones are left out.
func leftoverDirs() []string {
	dirs := make([]string, 0, 6)
	for _, d := range [...]string{"/dev/shm", "/dev/mqueue", "/tmp", "/var/tmp", "/run/lock", "/var/lock"} {
		if r, err := filepath.EvalSymlinks(d); err == nil && !slices.Contains(dirs, r) {
			dirs = append(dirs, r)
		}
	}
	return dirs
}

// asideRoots maps a shared directory (leftoverDirs) to where the directories of root's
// that its leftover trees are moved into are made (leftoverTrees.move), which is where
// a nexlet's start sweeps those of gone nexlets (sweepAside). nil, every nexlet's but a
// test's: the shared directory itself, where every native nexlet of the host looks. A
// test's nexlet has a directory of its own in each instead (ownAsideRoots), on the same
// file system (the move stays one rename): a test that made a gone nexlet's directory
// there had it removed by the start of any other nexlet of the host (another test
// binary's, an e2e node's) while it filled or counted it
// (TestSweepAsideStopsWithThePool), and a test's nexlet took such directories of other
// tests.
type asideRoots map[string]string

// of is where dir's trees go aside; "" (not moved) for a dir a test's roots leave out.
func (r asideRoots) of(dir string) string {
	if r == nil {
		return dir
	}
	return r[dir]
}

// dirs are the directories a nexlet's start sweeps (sweepAside).
func (r asideRoots) dirs() []string {
	if r == nil {
		return leftoverDirs()
	}
	return slices.Sorted(maps.Values(r))
}

// asideName begins the name of every directory of root's that leftover trees are moved
// into; asidePrefix adds the nexlet's pid and start time, so that a later nexlet can
// tell a directory a live nexlet is still removing from one a killed nexlet left
// (sweepAside).
const asideName = ".nexd-leftovers-"

func asidePrefix() string {
	id, err := procid.Of(os.Getpid())
	if err != nil {
		return asideName // sweepAside leaves such a name alone
	}
	return asideName + id.String() + "-"
}

// sweepAside removes the directories of root's that a release moved leftover trees into
// (leftoverTrees) and whose nexlet, named in it by pid and start time, is gone: a
// nexlet killed between its release's rename (under the lease lock) and its removal
// after it left them for good (454827a). A directory whose nexlet runs (its removal may
// be under way), one named otherwise (older nexlets' names carry no pid), and anything
// not a directory of root's of mode 0700 (a symlink is not followed) is left alone. It
// returns how many it removed, and the errors of those it could not.
//
// It ends at stop (nil: never), between two entries, with errSweepStopped: a killed
// nexlet may have left a tree of any size (100,000 files take 1.9 s here), and the
// nexlet's shutdown waits for it (stopPool). What is left keeps its name, so the next
// nexlet's start goes on with it. each, when set (tests), is called before each entry's
// removal.
func sweepAside(dirs []string, stop <-chan struct{}, each func()) (int, error) {
	removed := 0
	var errs []error
	for _, dir := range dirs {
		d, err := os.Open(dir)
		if err != nil {
			continue
		}
		names, _ := d.Readdirnames(-1)
		dfd := int(d.Fd())
		for _, name := range names {
			rest, ok := strings.CutPrefix(name, asideName)
			if !ok {
				continue
			}
			var st unix.Stat_t
			if unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil ||
				st.Mode&unix.S_IFMT != unix.S_IFDIR || st.Uid != 0 || st.Mode&0o7777 != 0o700 {
				continue
			}
			f := strings.SplitN(rest, "-", 3)
			if len(f) != 3 {
				continue
			}
			pid, perr := strconv.Atoi(f[0])
			start, serr := strconv.ParseUint(f[1], 10, 64)
			if perr != nil || serr != nil || pid <= 0 || (procid.ID{PID: pid, Start: start}).Alive() {
				continue
			}
			// In a sticky /tmp no other uid can replace root's entry; removeTreeAt
			// follows no symlink within it.
			if err := removeTreeAt(dfd, name, stop, each); errors.Is(err, errSweepStopped) {
				d.Close()
				return removed, errors.Join(append(errs, err)...)
			} else if err != nil {
				errs = append(errs, fmt.Errorf("leftovers of a gone nexlet: %s: %w", filepath.Join(dir, name), err))
				continue
			}
			removed++
		}
		d.Close()
	}
	return removed, errors.Join(errs...)
}

// errSweepStopped: sweepAside ended at its stop, leaving the rest to the next start.
var errSweepStopped = errors.New("sweep of leftovers stopped: the next start of the nexlet goes on with it")

// removeTreeAt removes name in the directory open as dfd, and all below it, as
// os.RemoveAll does (relative to open directories, following no symlink: one is
// removed, not what it names), but checks stop before each entry (errSweepStopped).
func removeTreeAt(dfd int, name string, stop <-chan struct{}, each func()) error {
	if each != nil {
		each()
	}
	select {
	case <-stop:
		return errSweepStopped
	default:
	}
	err := unix.Unlinkat(dfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM) {
		return fmt.Errorf("unlink %s: %w", name, err)
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", name, err)
	}
	d := os.NewFile(uintptr(fd), name)
	defer d.Close()
	for {
		// All names first, then their removal: a directory read on while its
		// entries go may skip some.
		names, err := d.Readdirnames(-1)
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		for _, n := range names {
			if err := removeTreeAt(fd, n, stop, each); err != nil {
				return err
			}
		}
		err = unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.ENOTEMPTY) || len(names) == 0 {
			return fmt.Errorf("rmdir %s: %w", name, err)
		}
		// Something came meanwhile: read it again from the start.
		if _, err := d.Seek(0, io.SeekStart); err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
	}
}

// removeUntil is remove entry by entry (removeTreeAt: following no symlink), ending at
// stop, between two entries, with errSweepStopped: what is left stays in its directory
// of root's, whose name is this nexlet's, for the next nexlet's start (sweepAside).
func (t *leftoverTrees) removeUntil(stop <-chan struct{}, before func(path string)) (map[uint32]error, error) {
	failed := map[uint32]error{}
	fail := func(uid uint32, err error) { failed[uid] = errors.Join(failed[uid], err) }
	dirs := map[string]int{} // a directory of root's -> its descriptor
	defer func() {
		for _, fd := range dirs {
			unix.Close(fd)
		}
	}()
	for _, tr := range t.trees {
		if before != nil {
			before(tr.path)
		}
		aside := filepath.Dir(tr.path)
		fd, ok := dirs[aside]
		if !ok {
			var err error
			if fd, err = unix.Open(aside, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
				fail(tr.uid, fmt.Errorf("dynamic uid %d: leftover %s: %w", tr.uid, tr.path, err))
				continue
			}
			dirs[aside] = fd
		}
		switch err := removeTreeAt(fd, filepath.Base(tr.path), stop, nil); {
		case errors.Is(err, errSweepStopped):
			return failed, err
		case err != nil:
			fail(tr.uid, fmt.Errorf("dynamic uid %d: leftover %s: %w", tr.uid, tr.path, err))
		}
	}
	for _, aside := range t.aside {
		_ = os.Remove(aside) // empty unless a tree above failed
	}
	return failed, nil
}

// remove removes the moved trees and the directories that held them, calling before
// (tests), when set, with each tree first; it returns the errors by uid.
func (t *leftoverTrees) remove(before func(path string)) map[uint32]error {
	failed := map[uint32]error{}
	for _, tr := range t.trees {
		if before != nil {
			before(tr.path)
		}
		if err := os.RemoveAll(tr.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			failed[tr.uid] = errors.Join(failed[tr.uid], fmt.Errorf("dynamic uid %d: leftover %s: %w", tr.uid, tr.path, err))
		}
	}
	for _, aside := range t.aside {
		_ = os.Remove(aside) // empty unless a tree above failed
	}
	return failed
}

// sysvOwned reads a /proc/sysvipc table and returns the ids of the objects owned or
// created by a uid in want, with that uid. A table that does not exist (no System V
// IPC in this kernel) holds nothing.
func sysvOwned(table, idCol string, want map[uint32]bool) (map[int]uint32, error) {
	f, err := os.Open(table)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("sysvipc: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return nil, sc.Err()
	}
	col := map[string]int{}
	for i, h := range strings.Fields(sc.Text()) {
		col[h] = i
	}
	ic, okI := col[idCol]
	uc, okU := col["uid"]
	cc, okC := col["cuid"]
	if !okI || !okU || !okC {
		return nil, fmt.Errorf("sysvipc: %s: no %s, uid and cuid columns", table, idCol)
	}
	out := map[int]uint32{}
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) <= max(ic, uc, cc) {
			continue
		}
		id, err := strconv.Atoi(f[ic])
		if err != nil {
			continue
		}
		for _, c := range [...]int{uc, cc} {
			if v, err := strconv.ParseUint(f[c], 10, 32); err == nil && want[uint32(v)] {
				out[id] = uint32(v)
				break
			}
		}
	}
	return out, sc.Err()
}

// sysvRemove removes a System V IPC object of the kind table names.
func sysvRemove(table string, id int) error {
	var errno syscall.Errno
	switch table {
	case "shm":
		_, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil)
		return err
	case "msg":
		_, _, errno = unix.Syscall(unix.SYS_MSGCTL, uintptr(id), unix.IPC_RMID, 0)
	case "sem":
		_, _, errno = unix.Syscall6(unix.SYS_SEMCTL, uintptr(id), 0, unix.IPC_RMID, 0, 0, 0)
	}
	if errno != 0 {
		return errno
	}
	return nil
}
