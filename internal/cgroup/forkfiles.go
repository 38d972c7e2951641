package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"

	"golang.org/x/sys/unix"
)

// A fork copies the forking thread's descriptor table and the child's execve closes
// every copy marked close-on-exec, one by one: with the native nexlet's thousands of
// workloads (two output FIFOs and a pidfd each) that was most of a start (15,000
// descriptors: 0.9 -> 2.0-2.5 ms, BenchmarkV1PoolStartHeld). So each fork pool thread
// gets a table of its own at its start (unshare(CLONE_FILES)) holding little, and
// takes the few descriptors a child needs from the process's table right before each
// fork (pidfd_getfd). Only the pool thread's own goroutine ever runs on it (it stays
// locked and ends with it; the runtime makes new threads from a thread of its own, not
// from a locked one), and whatever it opens it closes there.

// privateFiles gives the calling locked thread a descriptor table of its own that
// holds only 0-2 and the runtime's poller (its epoll and eventfd: the runtime uses
// them from every thread, by number) and returns a pidfd of this process in it. On an
// error after the unshare (shared false) the thread's table is its own but incomplete:
// it must fork nothing.
func privateFiles() (self int, shared bool, err error) {
	// The poller must exist before the copy (a pipe registers with it).
	r, w, err := os.Pipe()
	if err != nil {
		return -1, true, err
	}
	// Every start takes its child's descriptors with pidfd_getfd, which kernels before
	// 5.6 lack and seccomp filters may forbid (Docker's default allows it only with
	// CAP_SYS_PTRACE): without it the thread keeps the process's table.
	err = canGetfd(int(r.Fd()))
	r.Close()
	w.Close()
	if err != nil {
		return -1, true, err
	}
	if err := unix.Unshare(unix.CLONE_FILES); err != nil {
		return -1, true, fmt.Errorf("unshare(CLONE_FILES): %w", err)
	}
	ents, err := os.ReadDir("/proc/thread-self/fd")
	if err != nil {
		return -1, false, err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		switch l, _ := os.Readlink("/proc/thread-self/fd/" + e.Name()); l {
		case "anon_inode:[eventpoll]", "anon_inode:[eventfd]":
			continue
		}
		// Other copies would keep their files open (a socket's peer would see no
		// end of file, a flock would stay held) after the process closed them.
		unix.Close(fd)
	}
	self, err = unix.PidfdOpen(unix.Getpid(), 0)
	if err != nil {
		return -1, false, fmt.Errorf("pidfd_open(self): %w", err)
	}
	return self, false, nil
}

// canGetfd reports whether this thread can take a copy of the process's descriptor fd
// through a pidfd of the process.
func canGetfd(fd int) error {
	self, err := unix.PidfdOpen(unix.Getpid(), 0)
	if err != nil {
		return fmt.Errorf("pidfd_open(self): %w", err)
	}
	defer unix.Close(self)
	c, err := unix.PidfdGetfd(self, fd, 0)
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

// startPrivate starts cmd on a pool thread with a table of its own (privateFiles):
// the child's descriptors (files, from sharedFiles) are copied in from the process's
// table for the fork and closed after it. cmd's os.Process holds a pidfd numbered in
// this thread's table, so it is released here and *pid set: the caller makes a new one.
func startPrivate(cmd *exec.Cmd, self int, files []int, pid *int) error {
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
			return err
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
			return err
		}
		cmd.ExtraFiles[i] = f
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	*pid = cmd.Process.Pid
	_ = cmd.Process.Release()
	return nil
}
