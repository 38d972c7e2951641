// Package dirlock gives one process at a time a directory: a flock on a file in it,
// or on the directory itself for one that cannot hold a file (a cgroup: name ""),
// which the kernel releases when the holder dies however it dies, so a crashed holder
// never blocks its successor. The file is opened close-on-exec; a holder that
// re-executes itself (same pid, new image) keeps it across the execve instead
// (KeepAcrossExec, Inherit), so no other process can take it in between.
package dirlock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrHeld is wrapped by Hold when another process holds the directory.
var ErrHeld = errors.New("held by another process")

// Lock is a held directory.
type Lock struct{ f *os.File }

// Release lets go (closing the file); the kernel does the same when the process ends.
// A nil Lock (nothing held) is fine.
func (l *Lock) Release() {
	if l != nil {
		l.f.Close()
	}
}

// KeepAcrossExec returns a descriptor of the lock, numbered above 3 (where socket
// activation puts a listener), that an execve of this process keeps open: the lock
// stays held through the exec, and the new image takes it back with Inherit. Release
// still closes the lock's own descriptor (close-on-exec).
func (l *Lock) KeepAcrossExec() (int, error) {
	fd, err := unix.FcntlInt(l.f.Fd(), unix.F_DUPFD, 4) // F_DUPFD: without close-on-exec
	if err != nil {
		return -1, fmt.Errorf("keep the lock of %s across exec: %w", l.f.Name(), err)
	}
	return fd, nil
}

// Hold makes dir (mode perm when missing) and takes its lock file name exclusively,
// without waiting. The file then says the holder's pid, which a refused Hold names.
// With name "" the lock is on dir itself, which must exist, and nothing says the
// holder.
func Hold(dir, name string, perm os.FileMode) (*Lock, error) {
	if name == "" {
		f, err := os.Open(dir)
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		return take(f, dir, filepath.Clean(dir), false)
	}
	if err := os.MkdirAll(dir, perm); err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return take(f, dir, path, true)
}

// Inherit takes back, as Hold would take it, the lock of dir/name that this process
// kept across its execve (fd, from KeepAcrossExec). When fd is not that lock file
// (another dir's: the configuration changed), Forget drops it and Hold decides.
func Inherit(fd int, dir, name string, perm os.FileMode) (*Lock, error) {
	path := filepath.Join(dir, name)
	var got, want unix.Stat_t
	if fd < 3 || unix.Fstat(fd, &got) != nil || unix.Stat(path, &want) != nil || got.Dev != want.Dev || got.Ino != want.Ino {
		Forget(fd, name)
		return Hold(dir, name, perm)
	}
	unix.CloseOnExec(fd)
	// The file says this pid already: the same process wrote it before its exec.
	return take(os.NewFile(uintptr(fd), path), dir, path, false)
}

// Forget closes fd, kept across an execve (KeepAcrossExec) but not taken back, when it
// is a lock file called name (with name "": a directory); any other descriptor (a
// wrong number) is left alone.
func Forget(fd int, name string) {
	if fd < 3 {
		return
	}
	if name == "" {
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			unix.Close(fd)
		}
		return
	}
	if l, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); err == nil && filepath.Base(l) == name {
		unix.Close(fd)
	}
}

// take flocks f, the lock file path of dir (and writes this pid there when say); f is
// closed when it cannot.
func take(f *os.File, dir, path string, say bool) (*Lock, error) {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			if path == filepath.Clean(dir) { // the directory itself: no file says who
				return nil, fmt.Errorf("%s is %w", dir, ErrHeld)
			}
			if pid := holder(path); pid > 0 {
				return nil, fmt.Errorf("%s is %w, pid %d (lock file %s)", dir, ErrHeld, pid, path)
			}
			return nil, fmt.Errorf("%s is %w (lock file %s)", dir, ErrHeld, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if !say {
		return &Lock{f: f}, nil
	}
	// Say who holds it, for the next one refused. A failure here costs only that.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &Lock{f: f}, nil
}

// holder is the pid the lock file says, 0 if it says none (yet).
func holder(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}
