package procid

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// OpenPidfd opens a pidfd for id's process, registered with the netpoller, and checks
// that the pid still names that process once the pidfd pins it (a pid reused between
// the caller's check and the open is refused).
func OpenPidfd(id ID) (*os.File, error) {
	fd, err := unix.PidfdOpen(id.PID, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", id.PID, err)
	}
	f := os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(id.PID))
	if !id.Alive() {
		f.Close()
		return nil, fmt.Errorf("process %s is gone", id)
	}
	return f, nil
}

// WaitPidfd parks the calling goroutine until the process behind f has exited, or f is
// closed (an error). It works for any process, child or not; only a child can then be
// waited for its status.
func WaitPidfd(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		// The netpoller is edge-triggered: a process that exited before we started
		// waiting must be seen here.
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

// SignalPidfd sends sig to the process behind f: never by pid, which the process of
// another parent may have given up for reuse. It fails once f is closed.
func SignalPidfd(f *os.File, sig unix.Signal) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	return serr
}

// Signal sends sig to id's process through a pidfd opened and then checked to be still
// that process (its start time), never by the bare pid: a process that ended, whose
// pid went to another process since, is not signalled (an error wrapping unix.ESRCH).
// Raw descriptors: nothing to wait for on it, so it is not put in the netpoller.
func Signal(id ID, sig unix.Signal) error {
	fd, err := unix.PidfdOpen(id.PID, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", id.PID, err)
	}
	defer unix.Close(fd)
	if !id.Alive() {
		return fmt.Errorf("process %s: %w", id, unix.ESRCH)
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		return fmt.Errorf("signal %s: %w", id, err)
	}
	return nil
}
