package procid

import (
	"errors"
	"fmt"
	"os"
	"slices"
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
func Signal(id ID, sig unix.Signal) error {
	sent, err := SignalIf(id.PID, sig, func(int) bool { return id.Alive() })
	if err != nil {
		return fmt.Errorf("signal %s: %w", id, err)
	}
	if !sent {
		return fmt.Errorf("process %s: %w", id, unix.ESRCH)
	}
	return nil
}

// SignalIf sends sig to the process pid names if check says it is one to signal: Pin
// for one pid.
func SignalIf(pid int, sig unix.Signal, check func(pid int) bool) (sent bool, err error) {
	p := Pin([]int{pid})
	defer p.Close()
	got, err := p.Signal(sig, check)
	if len(got) == 0 && err == nil && !p.pinned(pid) {
		err = fmt.Errorf("process %d: %w", pid, unix.ESRCH)
	}
	return len(got) == 1, err
}

// Pinned holds processes a listing (/proc, cgroup.procs) named by pid a moment ago,
// each pinned by a pidfd, for Signal. The process a listed pid named may have ended
// since and its number gone to a stranger: a kill by the number then hits the
// stranger. So the caller pins the listed pids first, and only then checks (in
// Signal's keep) that each is still what it listed (its uid, its cgroup: a read of
// /proc/<pid>/..., a listing taken again), and the signal goes through the pidfd. A
// pinned process holds its number until it is reaped, so a signal that lands means the
// check read that process; one reaped meanwhile (the check may then have read a
// stranger with its number) is not signalled, nor is anybody else.
//
// Where pidfd_open is not to be had (a kernel before 5.3: ENOSYS; a seccomp filter's
// EPERM or ENOSYS), Pin reads each process's start time instead, and Signal sends by
// the number, right after keep, only while a second read finds the same start time:
// the window left is between that read and the kill, two system calls, not a listing
// and a check. A Pinned holds a descriptor a process: pin a bounded number at once.
type Pinned struct {
	pids   []int
	fds    []int    // pidfds, -1 for a process pinned by start time
	starts []uint64 // start times, for those without a pidfd
}

// Pin pins the processes pids name now (those that are gone are left out).
func Pin(pids []int) *Pinned {
	return pin(pids, true)
}

// pin is Pin; pidfds false pins by start time alone (tests).
func pin(pids []int, pidfds bool) *Pinned {
	p := &Pinned{}
	for _, pid := range pids {
		fd := -1
		if pidfds {
			var err error
			fd, err = unix.PidfdOpen(pid, 0)
			switch {
			case err == unix.ENOSYS || err == unix.EPERM:
				pidfds, fd = false, -1 // not here: start times for the rest
			case err != nil:
				continue // gone
			}
		}
		var start uint64
		if fd < 0 {
			st, err := ReadStat(pid)
			if err != nil {
				continue // gone
			}
			start = st.Start
		}
		p.pids = append(p.pids, pid)
		p.fds = append(p.fds, fd)
		p.starts = append(p.starts, start)
	}
	return p
}

func (p *Pinned) pinned(pid int) bool { return slices.Contains(p.pids, pid) }

// Signal sends sig to each pinned process keep, asked now, says to, and returns the
// pids signalled. A process that ended meanwhile is not signalled, without an error;
// err joins the other failures.
func (p *Pinned) Signal(sig unix.Signal, keep func(pid int) bool) (sent []int, err error) {
	var errs []error
	for i, pid := range p.pids {
		if !keep(pid) {
			continue
		}
		var err error
		if fd := p.fds[i]; fd >= 0 {
			err = unix.PidfdSendSignal(fd, sig, nil, 0)
		} else if st, serr := ReadStat(pid); serr != nil || st.Start != p.starts[i] {
			err = unix.ESRCH // the number names another process, or none
		} else {
			err = unix.Kill(pid, sig)
		}
		switch {
		case err == nil:
			sent = append(sent, pid)
		case err != unix.ESRCH:
			errs = append(errs, fmt.Errorf("signal %d: %w", pid, err))
		}
	}
	return sent, errors.Join(errs...)
}

// Close closes the pidfds.
func (p *Pinned) Close() {
	for _, fd := range p.fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	p.pids, p.fds, p.starts = nil, nil, nil
}
