package control

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// DefaultSocketPath is $NEX_CONTROL_SOCKET, else $RUNTIME_DIRECTORY/nexd.sock (systemd's
// RuntimeDirectory=), else /run/nex/nexd.sock. env is usually os.Getenv.
func DefaultSocketPath(env func(string) string) string {
	if p := env("NEX_CONTROL_SOCKET"); p != "" {
		return p
	}
	if d := env("RUNTIME_DIRECTORY"); d != "" {
		// systemd may list several directories separated by ':'; the first is ours.
		if i := indexByte(d, ':'); i >= 0 {
			d = d[:i]
		}
		return filepath.Join(d, "nexd.sock")
	}
	return "/run/nex/nexd.sock"
}

func indexByte(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == c {
			return i
		}
	}
	return -1
}

// listenUnix creates the socket safely: its directory 0755 when missing (not those
// above it), a stale
// socket removed only when nothing answers on it, then the socket is bound in a private
// (0700) directory next to path, given group gid (when >= 0) and mode there, and
// renamed into place, so it never exists at path with looser permissions. (A umask
// around bind would change the whole process's umask while other goroutines create
// files.)
func listenUnix(path string, mode fs.FileMode, gid int, warn func(string)) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	// The socket's own directory only (as /run/nex): a missing one above it is an
	// error, not a chain of directories made silently.
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("control socket directory %s: %w", dir, err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	private, err := os.MkdirTemp(dir, ".s")
	if err != nil {
		return nil, fmt.Errorf("control socket %s: private directory: %w", path, err)
	}
	defer os.RemoveAll(private)
	tmp := filepath.Join(private, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	// Close must not unlink: Server.Close removes the path itself, and only its own.
	l.SetUnlinkOnClose(false)
	if err := setOwnership(tmp, mode, gid, warn); err != nil {
		l.Close()
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return l, nil
}

// setOwnership gives the socket file group gid (when >= 0) and mode.
func setOwnership(path string, mode fs.FileMode, gid int, warn func(string)) error {
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			if !errors.Is(err, fs.ErrPermission) {
				return fmt.Errorf("control socket %s: chown to gid %d: %w", path, gid, err)
			}
			// An unprivileged nexd (development) cannot hand the socket to the group;
			// it still works for its own user and root.
			warn(fmt.Sprintf("cannot give control socket %s to gid %d: %v; only root and this user can use it", path, gid, err))
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("control socket %s: chmod %o: %w", path, mode, err)
	}
	return nil
}

// removeStale removes path when it is a socket nobody answers on; a live socket or a
// file that is not a socket is an error, never silently replaced.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("control socket %s: path exists and is not a socket (%s); refusing to replace it", path, fi.Mode().Type())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control socket %s: another process is serving on it (is nexd already running?)", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("control socket %s: probing existing socket: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("control socket %s: removing stale socket: %w", path, err)
	}
	return nil
}
