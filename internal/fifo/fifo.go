// Package fifo makes the named pipes that carry a child's output across restarts of
// whoever reads it: the child writes into a FIFO it holds open read-write, so its
// writes never meet a pipe without a reader (no EPIPE, no SIGPIPE) when the reader goes
// away, and the next reader opens the same path and reads what was written meanwhile
// (up to the pipe buffer; then the child's writes block, as with Docker's live restore).
package fifo

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// New makes a fresh FIFO dir/name (a stale one is replaced) with a pipe buffer of
// bufSize bytes where the kernel allows it, and returns the reader's end
// (non-blocking, on the netpoller) and the child's end (blocking, read-write).
func New(dir, name string, bufSize int) (r, w *os.File, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	path := filepath.Join(dir, name)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, err
	}
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return nil, nil, &os.PathError{Op: "mkfifo", Path: path, Err: err}
	}
	// O_RDWR never blocks on a FIFO and keeps a reader for as long as the child
	// holds it.
	wfd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	// Best effort: the default 64 KiB stays when the kernel refuses more.
	if _, err := unix.FcntlInt(uintptr(wfd), unix.F_SETPIPE_SZ, bufSize); err != nil {
		_, _ = unix.FcntlInt(uintptr(wfd), unix.F_SETPIPE_SZ, 256<<10)
	}
	w = os.NewFile(uintptr(wfd), path)
	r, err = OpenReader(path)
	if err != nil {
		w.Close()
		return nil, nil, err
	}
	return r, w, nil
}

// OpenReader opens an existing FIFO for reading without blocking; it refuses anything
// that is not a FIFO (a symlink or a regular file planted there).
func OpenReader(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
		f.Close()
		return nil, fmt.Errorf("%s is not a FIFO", path)
	}
	return f, nil
}
