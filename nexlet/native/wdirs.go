package native

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// A nexlet whose runtime directory others cannot search keeps its workloads in
// /run/nex-workloads/<hash of the runtime directory> (workloadsDir). Each such
// directory is held by its nexlet for its life with a shared flock on the directory
// itself, so that another nexlet can tell one nobody uses (an exclusive lock it can
// take) and remove it once it holds nothing but what dead nexlets made ahead, and,
// when the runtime directory it names (runtimeDirRecord) is gone, nothing but the
// directories of workloads that no longer run: the directories of runtime directories
// no nexlet comes back to (a test's, a node moved elsewhere or killed with its nexlet)
// no longer pile up there. A nexlet that waited for its lock while such a sweep removed
// the directory finds it unlinked and makes it again.

// runtimeDirRecord ends the name of the file beside such a directory (<hash>.runtime-dir)
// that names the runtime directory it belongs to; beside it, not in it, whose readers
// take everything in it for a workload's.
const runtimeDirRecord = ".runtime-dir"

// holdWorkloadsDir makes base and dir (0711, root's) and returns dir open with its
// shared lock, dir being the directory at that path when the lock was granted, with
// runtimeDir recorded in it.
func holdWorkloadsDir(base, dir, runtimeDir string) (*os.File, error) {
	for try := 0; ; try++ {
		for _, d := range []string{base, dir} {
			if err := os.Mkdir(d, 0o711); err != nil && !errors.Is(err, fs.ErrExist) {
				return nil, err
			}
			if err := checkPrivateDir(d); err != nil {
				return nil, err
			}
			if err := os.Chmod(d, 0o711); err != nil {
				return nil, err
			}
		}
		f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: lock: %w", dir, err)
		}
		if sameDir(f, dir) {
			rec := dir + runtimeDirRecord
			if b, err := os.ReadFile(rec); err != nil || string(b) != runtimeDir+"\n" {
				if err := os.WriteFile(rec, []byte(runtimeDir+"\n"), 0o600); err != nil {
					f.Close()
					return nil, err
				}
			}
			return f, nil
		}
		f.Close() // removed by a sweep while we waited for the lock
		if try >= 10 {
			return nil, fmt.Errorf("%s: removed again and again while it was being made", dir)
		}
	}
}

// sameDir says whether f (a directory) is still the one at path.
func sameDir(f *os.File, path string) bool {
	var a, b unix.Stat_t
	if unix.Fstat(int(f.Fd()), &a) != nil || unix.Lstat(path, &b) != nil {
		return false
	}
	return a.Nlink > 0 && a.Dev == b.Dev && a.Ino == b.Ino
}

// removeWorkloadsDir lets go of hold, the nexlet's lock on dir, and removes dir when
// no other nexlet holds it and nothing is left in it (a clean stop with no workload
// left running), with its record. true: it went.
func removeWorkloadsDir(hold *os.File, dir string) bool {
	defer hold.Close()
	// Another nexlet of the same runtime directory (a hand-over) holds it too: the
	// exclusive lock is refused and it stays.
	if unix.Flock(int(hold.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil || !sameDir(hold, dir) {
		return false
	}
	return removeEmptyWorkloadsDir(dir)
}

// removeEmptyWorkloadsDir removes dir (its exclusive lock held) when it is empty, and
// its record.
func removeEmptyWorkloadsDir(dir string) bool {
	if unix.Rmdir(dir) != nil {
		return false
	}
	_ = os.Remove(dir + runtimeDirRecord)
	return true
}

// sweepWorkloadDirs removes the directories of base (/run/nex-workloads) other than own
// that no nexlet holds and that are empty once the directories dead nexlets made ahead
// are gone (removeStaleReady). In one whose runtime directory is gone (no nexlet can
// come back to it), the directories of workloads that ran as a dynamic uid no process
// runs as any more go first, with their uid's lease, lock file and leftovers (u's, as a
// release frees them; nil: none go). A directory with another workload's in it stays,
// whether the workload runs or not: the next nexlet of its runtime directory adopts or
// tidies it. It returns how many went.
func sweepWorkloadDirs(base, own string, u *users) int {
	ents, err := os.ReadDir(base)
	if err != nil {
		return 0
	}
	removed := 0
	for _, e := range ents {
		p := filepath.Join(base, e.Name())
		if d, ok := strings.CutSuffix(p, runtimeDirRecord); ok && !e.IsDir() {
			// A record whose directory went some other way (removed by hand).
			if _, err := os.Lstat(d); errors.Is(err, fs.ErrNotExist) {
				_ = os.Remove(p)
			}
			continue
		}
		if !e.IsDir() || p == own {
			continue
		}
		f, err := os.OpenFile(p, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil && sameDir(f, p) {
			removeStaleReady(p)
			if u != nil && abandoned(p) {
				u.removeEndedWorkloads(p)
			}
			if removeEmptyWorkloadsDir(p) {
				removed++
			}
		}
		f.Close()
	}
	return removed
}

// abandoned says whether the runtime directory dir's record names is gone.
func abandoned(dir string) bool {
	b, err := os.ReadFile(dir + runtimeDirRecord)
	if err != nil {
		return false
	}
	rt := strings.TrimSpace(string(b))
	if !filepath.IsAbs(rt) {
		return false
	}
	_, err = os.Lstat(rt)
	return errors.Is(err, fs.ErrNotExist)
}

// removeEndedWorkloads removes, from dir, the directories of workloads that ran as a
// dynamic uid that no process runs as, each after its uid's leftovers, and its uid's
// lease (when it still names that directory) and systemd lock; and the directories with
// no identity (made by a start that died before its lease named them).
func (u *users) removeEndedWorkloads(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	busy, err := u.walk()
	if err != nil {
		return
	}
	for _, e := range ents {
		if !e.IsDir() || !validID(e.Name()) {
			continue
		}
		wd := filepath.Join(dir, e.Name())
		id, ok := readIdent(wd)
		if !ok {
			if _, err := os.Lstat(filepath.Join(wd, homeDirName)); errors.Is(err, fs.ErrNotExist) {
				_ = os.RemoveAll(wd)
			}
			continue
		}
		if !id.dynamic || id.uid == 0 || busy[id.uid] {
			continue
		}
		if !u.freeEnded(id.uid, wd) {
			continue
		}
		_ = os.RemoveAll(wd)
	}
}

// freeEnded removes what uid left behind and frees its lease if that names wd, an
// ended workload's directory, or there is none; false when that removal failed (the
// directory and the lease stay). Under the lease lock, as a release does: a lease that
// names another holder (the uid freed by a release whose nexlet died before it removed
// the directory, and leased again since) is that holder's, and so are the uid's files
// and IPC objects, while it runs no process too (a service in restart backoff, a pooled
// uid). Before, they were removed ahead of the lock and of any look at the lease
// (TestEndedWorkloadSweepSparesNewHolder). Directories are moved aside there and
// removed after the lock (see moveLeftovers).
func (u *users) freeEnded(uid uint32, wd string) bool {
	unlock, err := u.lock()
	if err != nil {
		return false
	}
	b, err := os.ReadFile(u.leasePath(uid))
	ours := err == nil && leaseOwner(b) == wd
	if !ours && !errors.Is(err, fs.ErrNotExist) {
		unlock()
		return true // another holder's uid: the directory alone goes
	}
	failed, trees := moveLeftovers(u.proc, u.asideRoots, map[uint32]bool{uid: true})
	if ours && failed[uid] == nil {
		_ = u.freeLocked(uid, nil)
	}
	unlock()
	left := trees.remove(nil)
	return failed[uid] == nil && left[uid] == nil
}
