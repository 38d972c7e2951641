// Package dirlock gives one process at a time a directory: a flock on a file in it,
// which the kernel releases when the holder dies however it dies, so a crashed holder
// never blocks its successor. The file is opened close-on-exec: a re-executing holder
// (same pid, new image) lets go at the execve and takes it again.
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

// Hold makes dir (mode perm when missing) and takes its lock file name exclusively,
// without waiting. The file then says the holder's pid, which a refused Hold names.
// release lets go (closing the file); the kernel does the same when the process ends.
func Hold(dir, name string, perm os.FileMode) (release func(), err error) {
	if err := os.MkdirAll(dir, perm); err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			if pid := holder(path); pid > 0 {
				return nil, fmt.Errorf("%s is %w, pid %d (lock file %s)", dir, ErrHeld, pid, path)
			}
			return nil, fmt.Errorf("%s is %w (lock file %s)", dir, ErrHeld, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	// Say who holds it, for the next one refused. A failure here costs only that.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil
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
