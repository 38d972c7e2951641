package native

import (
	"fmt"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Waiting for a process with cmd.Wait (wait4/waitid) blocks an OS thread for as long
// as the process runs: one thread per workload. A pidfd becomes readable when its
// process exits, so the nexlet's watcher waits for all of them in one epoll set; the
// wait for the status that follows returns at once.

// openPidfd opens a non-blocking pidfd for pid. It must be called while pid cannot
// have been reused: for a child, before it is reaped.
func openPidfd(pid int) (int, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK) // always close-on-exec
	if err != nil {
		return -1, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	return fd, nil
}

// sigchldInfo is the part of a siginfo_t that waitid fills for a child (x/sys/unix's
// Siginfo keeps it opaque).
type sigchldInfo struct {
	Signo, Errno, Code, _ int32
	Pid                   int32
	UID                   uint32
	Status                int32
	_                     [100]byte
}

// reapPidfd reaps the exited child behind a pidfd (waitid P_PIDFD) and says how it
// ended, as exitStatus does. Used when the os.Process was released, so that a workload
// costs one pidfd, not two (Go's os.Process holds one of its own). It waits (polling the
// non-blocking pidfd) while the child still runs.
func reapPidfd(pidfd int) (int, string, error) { return waitPidfd(pidfd, unix.WEXITED) }

// peekPidfd says how the exited child behind a pidfd ended, as reapPidfd does, and
// leaves it unreaped (WNOWAIT): a nexlet that dies before the reap leaves the child to
// nexd, which reaps it and records its exit.
func peekPidfd(pidfd int) (int, string, error) { return waitPidfd(pidfd, unix.WEXITED|unix.WNOWAIT) }

func waitPidfd(pidfd, options int) (int, string, error) {
	var info sigchldInfo
	for {
		_, _, errno := unix.Syscall6(unix.SYS_WAITID, unix.P_PIDFD, uintptr(pidfd), uintptr(unsafe.Pointer(&info)), uintptr(options), 0, 0)
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			time.Sleep(20 * time.Millisecond)
			continue
		default:
			return -1, fmt.Sprintf("wait: %v", errno), errno
		}
		break
	}
	switch info.Code {
	case 1: // CLD_EXITED
		if info.Status != 0 {
			return int(info.Status), "exited with code " + strconv.Itoa(int(info.Status)), nil
		}
		return 0, "exited", nil
	default: // CLD_KILLED, CLD_DUMPED
		sig := syscall.Signal(info.Status)
		return 128 + int(sig), "killed by signal " + sig.String(), nil
	}
}
