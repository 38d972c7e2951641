package native

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// DefaultSystemdUIDDir is where systemd locks the uids it gives DynamicUser= services:
// one file per uid, /run/systemd/dynamic-uid/<uid>, held under a BSD lock (flock) for as
// long as the uid is in use.
const DefaultSystemdUIDDir = "/run/systemd/dynamic-uid"

// sdLocks holds systemd's lock on each dynamic uid this nexlet leases, as systemd's
// own allocator takes it (src/core/dynamic-user.c, pick_uid): open the uid's file with
// O_CREAT|O_NOFOLLOW, flock(LOCK_EX|LOCK_NB), and start over when the file was
// unlinked meanwhile (st_nlink 0). systemd skips a uid whose lock it cannot take
// (EAGAIN) and looks at nothing else nexd owns (processes, nexd's leases), so without
// this a DynamicUser= service started later could be given a running workload's uid.
// A release unlinks the file and then closes it, as systemd does: an allocator that
// opened the file before the unlink gets the lock of an unlinked file, sees st_nlink 0
// and opens afresh. The files stay empty: systemd reads a lock file's first line as its
// dynamic user's name only to check it against its own table of users, which has no
// nexd user, so nss-systemd knows no name for a workload's uid.
//
// flock belongs to the open file, so the locks live as long as this nexlet's
// descriptors or nexd's copies of them (sdkeep.go): a nexlet that dies leaves them to
// nexd's copies, which the next one takes over as it adopts the workloads that outlived
// it (users.hold).
type sdLocks struct {
	dir  string
	keep *sdKeeper // nexd's copies; nil: none kept
	mu   sync.Mutex
	fds  map[uint32]*os.File
}

// take takes systemd's lock on uid; false when another process holds it (a systemd
// dynamic user, or another nexlet's workload). A lock this nexlet holds already is
// taken. Without locks to take (nil) every uid is taken.
func (s *sdLocks) take(uid uint32) (bool, error) {
	if s == nil {
		return true, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.fds[uid]; ok {
		return true, nil
	}
	f, ok, err := s.lockLocked(uid, unix.O_CREAT)
	if ok {
		s.fds[uid] = f
		s.tell(UIDLockHold, uid, f)
	}
	return ok, err
}

// lockLocked takes systemd's lock on uid's file as pick_uid does (s.mu held): the
// file, open, when the lock was free; false when another process holds it, or (flags
// without O_CREAT) there is no file.
func (s *sdLocks) lockLocked(uid uint32, flags int) (*os.File, bool, error) {
	path := s.path(uid)
	made := false
	for {
		fd, err := unix.Open(path, flags|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOCTTY, 0o600)
		if flags&unix.O_CREAT == 0 && errors.Is(err, unix.ENOENT) {
			return nil, false, nil
		}
		if errors.Is(err, unix.ENOENT) && !made {
			// The directory went after the nexlet started (removed by hand or by a
			// test's clean-up; systemd never removes it): made again as pick_uid makes
			// it, or every lease would fail.
			made = true
			_ = os.Mkdir(s.dir, 0o755)
			continue
		}
		if err != nil {
			return nil, false, fmt.Errorf("systemd's dynamic uid lock %s: %w", path, err)
		}
		f := os.NewFile(uintptr(fd), path)
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) || errors.Is(err, unix.EBUSY) {
				return nil, false, nil
			}
			return nil, false, fmt.Errorf("systemd's dynamic uid lock %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			f.Close()
			return nil, false, fmt.Errorf("systemd's dynamic uid lock %s: %w", path, err)
		}
		if st.Nlink > 0 {
			return f, true, nil
		}
		f.Close() // unlinked by its holder's release before we locked it
	}
}

// drop gives systemd's lock on uid back: the file is unlinked, then closed. A lock
// this nexlet does not hold is one a dead nexlet left (its workload ended while no
// nexlet ran, so none took it again): its file goes too when nobody holds it, as
// systemd's own release would leave none; one another process holds (systemd gave the
// uid to a DynamicUser= service meanwhile) stays
// (TestSystemdUIDLockFileGoesWithAnUnwatchedEnd).
func (s *sdLocks) drop(uid uint32) {
	if s == nil {
		return
	}
	s.waitSynced() // a dead nexlet's lock is nexd's copy until handed over
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.fds[uid]
	if !ok {
		if f, ok, _ = s.lockLocked(uid, 0); !ok {
			return
		}
	}
	_ = os.Remove(s.path(uid))
	f.Close()
	delete(s.fds, uid)
	s.tell(UIDLockDrop, uid, nil) // after the unlink: nexd's copy is worthless now
}

// sweepFree removes uid's lock file when it is empty and nobody holds its lock, as drop
// does for a lock this nexlet does not hold. The caller (users.sweepStale, under the
// lease lock) checked that no lease names uid; busy: a process runs as uid. A lock this
// nexlet holds for no lease is a copy nexd handed over of a nexlet killed in a release,
// after the lease went and before the file did (nexd keeps it, so every next nexlet was
// handed it again): given back as drop does, unless a process runs as uid. true: the
// file went.
func (s *sdLocks) sweepFree(uid uint32, busy bool) bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if f, ok := s.fds[uid]; ok {
		if busy {
			return false
		}
		_ = os.Remove(s.path(uid))
		f.Close()
		delete(s.fds, uid)
		s.tell(UIDLockDrop, uid, nil)
		return true
	}
	f, ok, _ := s.lockLocked(uid, 0)
	if !ok {
		return false
	}
	defer f.Close()
	// Empty under the lock: systemd writes its user's name while it holds it.
	if fi, err := f.Stat(); err != nil || fi.Size() != 0 {
		return false
	}
	return os.Remove(s.path(uid)) == nil
}

// closeAll lets this nexlet's descriptors go as its exit would: the files stay, locked
// by nexd's copies where it keeps them, and the next nexlet takes them over (or their
// locks again) as it adopts the workloads still running.
func (s *sdLocks) closeAll() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for uid, f := range s.fds {
		f.Close()
		delete(s.fds, uid)
	}
}

func (s *sdLocks) path(uid uint32) string {
	return filepath.Join(s.dir, strconv.FormatUint(uint64(uid), 10))
}

// openSDLocks prepares systemd's lock directory dir. Where systemd runs (dir's parent,
// /run/systemd, exists) the directory is made as systemd makes it (0755) when missing;
// a host without systemd has no DynamicUser= to share uids with (nil, ""). A directory
// nexd cannot write (nexd.service without ReadWritePaths=-/run/systemd/dynamic-uid)
// gives nil and a warning: nexd then only avoids uids systemd holds, as before.
func openSDLocks(dir string) (*sdLocks, string) {
	if dir == "" {
		return nil, ""
	}
	if _, err := os.Stat(filepath.Dir(dir)); err != nil {
		return nil, ""
	}
	_ = os.Mkdir(dir, 0o755)
	if err := unix.Access(dir, unix.W_OK); err != nil {
		return nil, fmt.Sprintf("systemd's dynamic uid locks in %s cannot be taken (%v): nexd avoids the uids systemd gave DynamicUser= services, but a DynamicUser= service started after a workload may be given the workload's uid; let nexd write there (nexd.service: ReadWritePaths=-%s) or set workload_uid_range outside systemd's 61184-65519", dir, err, dir)
	}
	return &sdLocks{dir: dir, fds: map[uint32]*os.File{}}, ""
}
