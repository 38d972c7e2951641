package cgroup

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

// A fork copies the forking thread's descriptor table and the child's execve closes
// every copy marked close-on-exec, one by one: with the native nexlet's thousands of
// workloads (two output FIFOs and a pidfd each) that was most of a start (15,000
// descriptors: 0.9 -> 2.0-2.5 ms, BenchmarkV1StartHeld). So each thread that forks into
// a v1 group (a fork pool thread, or the thread a start moves into the group) gets a
// table of its own holding little (ownTable), and takes the few descriptors a child
// needs from the process's table right before the fork (pidfd_getfd). Only the
// thread's own locked goroutine ever runs on it (it ends with that goroutine; the
// runtime makes new threads from a thread of its own, not from a locked one), and
// whatever it opens it closes there.

// pollerFDs lists the descriptors a thread's own table must keep at their numbers:
// the runtime's poller (its epoll and eventfd, made here if not yet), which the
// runtime uses by number from any thread (a throw when they are missing). They are
// found by kind (an epoll or eventfd of the process's own is kept too).
func pollerFDs() ([]int, error) {
	r, w, err := os.Pipe() // registers with the poller, making it
	if err != nil {
		return nil, err
	}
	r.Close()
	w.Close()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		switch l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l {
		case "anon_inode:[eventpoll]", "anon_inode:[eventfd]":
			fds = append(fds, fd)
		}
	}
	return fds, nil
}

// ownTable gives the calling locked thread (never the main one) a descriptor table of
// its own holding only 0-2 and the poller's descriptors (pollerFDs), and returns a pidfd
// of this process in it. Other copies would also keep their files open (a socket's
// peer would see no end of file, a flock would stay held) after the process closed
// them. One close_range copies only the descriptors up to the poller's (made early,
// so few), not the thousands above. shared is true when the thread still has the
// process's table; otherwise an error means the table is its own but unusable: the
// thread must fork nothing.
func (m *Manager) ownTable() (self int, shared bool, err error) {
	t := &m.table
	defer func() {
		if shared && err != nil {
			t.warn.Do(func() {
				m.log.Warn("forking threads keep the process's descriptor table: each fork copies all of it", "err", err)
			})
		}
	}()
	t.once.Do(func() {
		if t.keep, t.err = pollerFDs(); t.err != nil {
			return
		}
		// Every start takes its child's descriptors with pidfd_getfd, which kernels
		// before 5.6 lack and seccomp filters may forbid (Docker's default allows it
		// only with CAP_SYS_PTRACE): without it the thread keeps the process's table.
		// Asked once, on the first such thread: all run the same threadSetup.
		t.err = canGetfd()
	})
	if t.err != nil {
		return -1, true, t.err
	}
	top := 2
	for _, fd := range t.keep {
		top = max(top, fd)
	}
	if err := unix.CloseRange(uint(top+1), math.MaxUint32, unix.CLOSE_RANGE_UNSHARE); err != nil {
		return -1, true, fmt.Errorf("close_range(CLOSE_RANGE_UNSHARE): %w", err)
	}
	for fd := 3; fd < top; fd++ {
		if !slices.Contains(t.keep, fd) {
			unix.Close(fd)
		}
	}
	self, err = unix.PidfdOpen(unix.Getpid(), 0)
	if err != nil {
		return -1, false, fmt.Errorf("pidfd_open(self): %w", err)
	}
	return self, false, nil
}

// canGetfd reports whether this thread can take a copy of a descriptor of the
// process through a pidfd of the process.
func canGetfd() error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	defer w.Close()
	self, err := unix.PidfdOpen(unix.Getpid(), 0)
	if err != nil {
		return fmt.Errorf("pidfd_open(self): %w", err)
	}
	defer unix.Close(self)
	c, err := unix.PidfdGetfd(self, int(r.Fd()), 0)
	if err != nil {
		return fmt.Errorf("pidfd_getfd: %w", err)
	}
	unix.Close(c)
	return nil
}

// sharedFiles lists the descriptors cmd's child gets, as numbers in the process's
// table: Stdin, Stdout and Stderr (-1 for none), then ExtraFiles. ok is false for a
// command a pool thread with a table of its own cannot start: a stream that is not an
// *os.File (its pipe and copying goroutine would use this thread's numbers elsewhere),
// a context (its goroutine signals through the process's pidfd), or a SysProcAttr
// that returns a descriptor (PidFD: numbered in this thread's table) or names one of
// the process's for the fork (CgroupFD, Foreground's Ctty).
func sharedFiles(cmd *exec.Cmd) (files []int, ok bool) {
	if cmd.Cancel != nil || cmd.WaitDelay != 0 {
		return nil, false
	}
	if a := cmd.SysProcAttr; a != nil && (a.PidFD != nil || a.UseCgroupFD || a.Foreground) {
		return nil, false
	}
	files = make([]int, 0, 3+len(cmd.ExtraFiles))
	for _, s := range []any{cmd.Stdin, cmd.Stdout, cmd.Stderr} {
		switch f := s.(type) {
		case nil:
			files = append(files, -1)
		case *os.File:
			if f == nil {
				return nil, false
			}
			files = append(files, int(f.Fd()))
		default:
			return nil, false
		}
	}
	for _, f := range cmd.ExtraFiles {
		if f == nil {
			files = append(files, -1)
		} else {
			files = append(files, int(f.Fd()))
		}
	}
	return files, true
}

// start starts cmd on this thread and returns its pid. With self a pidfd of this
// process (ownTable) the thread has a table of its own: the child's descriptors
// (files, from sharedFiles) are copied in from the process's table for the fork and
// closed after it, and cmd's os.Process, holding a pidfd numbered in this thread's
// table, is released here: the caller makes a new one (ownProcess).
func start(cmd *exec.Cmd, self int, files []int) (pid int, err error) {
	if self < 0 {
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		return cmd.Process.Pid, nil
	}
	var held []*os.File
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	get := func(fd int) (*os.File, error) {
		if fd < 0 {
			return nil, nil
		}
		nfd, err := unix.PidfdGetfd(self, fd, 0)
		if err != nil {
			return nil, fmt.Errorf("descriptor %d for the child: pidfd_getfd: %w", fd, err)
		}
		f := os.NewFile(uintptr(nfd), "")
		held = append(held, f)
		return f, nil
	}
	in, out, errOut, extra := cmd.Stdin, cmd.Stdout, cmd.Stderr, cmd.ExtraFiles
	defer func() { cmd.Stdin, cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = in, out, errOut, extra }()
	var std [3]*os.File
	for i := range std {
		f, err := get(files[i])
		if err != nil {
			return 0, err
		}
		std[i] = f
	}
	// A nil *os.File in an io.Reader or io.Writer would not be nil.
	if std[0] != nil {
		cmd.Stdin = std[0]
	}
	if std[1] != nil {
		cmd.Stdout = std[1]
	}
	if std[2] != nil {
		cmd.Stderr = std[2]
	}
	cmd.ExtraFiles = make([]*os.File, len(files)-3)
	for i, fd := range files[3:] {
		f, err := get(fd)
		if err != nil {
			return 0, err
		}
		cmd.ExtraFiles[i] = f
	}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	pid = cmd.Process.Pid
	_ = cmd.Process.Release()
	return pid, nil
}

// ownProcess gives cmd an os.Process of the caller's (the process's) table for pid
// when start released the one Start made: our child, not waited for, so the pid is
// still its own.
func ownProcess(cmd *exec.Cmd, pid int) {
	if cmd.Process.Pid != pid {
		cmd.Process, _ = os.FindProcess(pid)
	}
}

// lockedOffMain runs fn in a new goroutine locked to an OS thread that is not the
// process's main thread: the main thread's descriptor table is the one pidfd_getfd
// reads (start), so it must never become a thread's own (ownTable). fn's thread
// ends with it unless fn unlocks it.
func lockedOffMain(fn func()) {
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() != unix.Getpid() {
			fn()
			return
		}
		// The main thread: another goroutine takes over, which cannot get this thread
		// while it stays locked here.
		locked := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(locked)
			fn()
		}()
		<-locked
		runtime.UnlockOSThread()
	}()
}
