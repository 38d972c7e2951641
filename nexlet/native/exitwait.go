package native

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Waiting for a process with cmd.Wait (wait4/waitid) blocks an OS thread for as long
// as the process runs: one thread per workload. A pidfd becomes readable when its
// process exits, so registering it with the Go netpoller parks only a goroutine; the
// Wait that follows returns at once.

// openPidfd opens a pidfd for pid, registered with the netpoller. It must be called
// while pid cannot have been reused: for a child, before it is reaped.
func openPidfd(pid int) (*os.File, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	return os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid)), nil
}

// waitExit parks the calling goroutine until the process behind f has exited, or f is
// closed (an error). An error also means the netpoller cannot watch f; a caller that did
// not close f then falls back to a blocking wait.
func waitExit(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		// Readiness check without blocking: the netpoller is edge-triggered, so a
		// process that exited before we started waiting must be seen here.
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 0)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				perr = fmt.Errorf("poll %s: %w", f.Name(), err)
				return true
			}
			return n > 0
		}
	})
	if err != nil {
		return fmt.Errorf("wait for %s: %w", f.Name(), err)
	}
	return perr
}
