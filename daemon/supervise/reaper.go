package supervise

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

// reaper makes nexd the child subreaper of its subtree: a workload whose nexlet died is
// reparented to nexd instead of init, so nexd reaps it and keeps its exit status in an
// exit record (procid.WriteExit) for the nexlet that adopts the workload later. The
// record is written into the space its nexlet reserved for it at its launch
// (procid.ReserveExit): a full runtime directory does not lose it.
//
// The supervisor's own children (the nexlets) are waited for by their exec.Cmd; the
// reaper never reaps them: forks happen under forkMu and the pid is recorded in own
// before the lock is released, and the reaper decides under the same lock.
type reaper struct {
	log   *slog.Logger
	exits string // directory of exit records

	forkMu sync.Mutex
	own    map[int]bool // pids the supervisor waits for itself
}

func newReaper(log *slog.Logger, exitsDir string) (*reaper, error) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(exitsDir, 0o700); err != nil {
		return nil, err
	}
	return &reaper{log: log, exits: exitsDir, own: map[int]bool{}}, nil
}

// started records a child the supervisor waits for; call with forkMu held.
func (r *reaper) started(pid int) { r.own[pid] = true }

// waited forgets a child once its exec.Cmd has reaped it.
func (r *reaper) waited(pid int) {
	r.forkMu.Lock()
	delete(r.own, pid)
	r.forkMu.Unlock()
}

// run reaps on every SIGCHLD (and every few seconds, in case signals coalesced) until
// ctx ends.
func (r *reaper) run(ctx context.Context) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGCHLD)
	defer signal.Stop(ch)
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	r.reap()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
		case <-t.C:
		}
		r.reap()
	}
}

// reap collects every exited child that is not one of the supervisor's own.
func (r *reaper) reap() {
	r.forkMu.Lock()
	defer r.forkMu.Unlock()
	for {
		var info unix.Siginfo
		// Peek first: the child may be a nexlet whose exec.Cmd must reap it itself.
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if err != nil {
			return // ECHILD: no children at all
		}
		pid := int(siginfoPid(&info))
		if pid == 0 {
			return // children, none exited
		}
		if r.own[pid] {
			// A nexlet's zombie stands first in line; look for others past it.
			r.reapScan()
			return
		}
		r.reapOne(pid)
	}
}

// reapScan finds zombie children by scanning /proc (the kernel here may lack
// /proc/<pid>/task/<tid>/children).
func (r *reaper) reapScan() {
	self := os.Getpid()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || r.own[pid] {
			continue
		}
		st, err := procid.ReadStat(pid)
		if err == nil && st.PPID == self && st.State == 'Z' {
			r.reapOne(pid)
		}
	}
}

func (r *reaper) reapOne(pid int) {
	id, idErr := procid.Of(pid) // a zombie's stat still holds its start time
	uid, uidErr := procid.UID(pid)
	var ws syscall.WaitStatus
	got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
	if err != nil || got != pid {
		if err != nil && !errors.Is(err, syscall.ECHILD) {
			r.log.Warn("reaping an orphaned process failed", "pid", pid, "err", err)
		}
		return
	}
	ex := procid.ExitOf(ws)
	ex.UID, ex.HasUID = uid, uidErr == nil
	if idErr != nil {
		r.log.Warn("reaped an orphaned process without its start time; exit not recorded", "pid", pid, "err", idErr)
		return
	}
	if err := procid.WriteExit(r.exits, id, ex); err != nil {
		r.log.Warn("cannot record the exit of an orphaned workload", "pid", pid, "err", err)
		return
	}
	r.log.Info("reaped an orphaned workload", "pid", pid, "exit_code", ex.Code, "reason", ex.Reason)
}

// pruneExits removes exit records older than a day: no nexlet came for them. A
// reserve of an exit record (procid.ReserveExit, made at a workload's launch) goes only
// once its process no longer runs: a workload may run for longer than a day.
func pruneExits(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if id, ok := procid.ReserveOf(e.Name()); ok && id.Alive() {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > 24*time.Hour {
			_ = os.Remove(dir + "/" + e.Name())
		}
	}
}

// siginfoPid reads si_pid of a SIGCHLD siginfo: the union after signo, errno and code
// starts at the next pointer-aligned offset (16 on 64-bit, 12 on 32-bit).
func siginfoPid(info *unix.Siginfo) int32 {
	off := uintptr(12)
	if unsafe.Sizeof(uintptr(0)) == 8 {
		off = 16
	}
	return *(*int32)(unsafe.Add(unsafe.Pointer(info), off))
}
