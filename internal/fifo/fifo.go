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
	w, err = NewWriter(dir, name, bufSize)
	if err != nil {
		return nil, nil, err
	}
	r, err = OpenReader(w.Name())
	if err != nil {
		w.Close()
		return nil, nil, err
	}
	return r, w, nil
}

// NewWriter is New without the reader's end: the caller opens it as it needs
// (OpenReader, or OpenReaderFd for a descriptor of its own poller).
func NewWriter(dir, name string, bufSize int) (w *os.File, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, name)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return nil, &os.PathError{Op: "mkfifo", Path: path, Err: err}
	}
	// O_RDWR never blocks on a FIFO and keeps a reader for as long as the child
	// holds it.
	wfd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	// Best effort: the default 64 KiB stays when the kernel refuses more.
	if _, err := unix.FcntlInt(uintptr(wfd), unix.F_SETPIPE_SZ, bufSize); err != nil {
		_, _ = unix.FcntlInt(uintptr(wfd), unix.F_SETPIPE_SZ, 256<<10)
	}
	return os.NewFile(uintptr(wfd), path), nil
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

// OpenReaderFd is OpenReader returning the bare descriptor (non-blocking, close-on-exec,
// not on Go's netpoller), for a caller that polls many FIFOs itself.
func OpenReaderFd(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		unix.Close(fd)
		return -1, fmt.Errorf("%s is not a FIFO", path)
	}
	return fd, nil
}
