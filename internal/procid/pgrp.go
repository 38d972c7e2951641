package procid

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Pgrp is a process group its owner made (a child started with Setpgid) or found by
// a record it verified, named by its leader's identity. A group's number is its
// leader's pid, which the kernel keeps from reuse only while the leader or a member of
// the group exists: once the group is empty the number goes back to the pool (pid_max
// is 32768 on many hosts), and a stranger's process that makes itself a group leader
// (another workload, a shell's job, a service) names its own group with it. A kill by
// the bare number (kill(-pgid), or of every process whose group matches it) then kills
// the stranger.
//
// So a Pgrp holds a pidfd of its leader, opened while the leader is known to be the
// one (NewPgrp; NewChildPgrp: once the caller's child exited, before its reap, its
// unreaped pid holding the number till then), and signals the group through it (pidfd_send_signal with
// PIDFD_SIGNAL_PROCESS_GROUP, Linux 6.9): the kernel resolves the group the leader's
// pid names, the same object for as long as the pidfd is held, not the number, so a
// group that ended is never confused with the stranger's that got its number (ESRCH),
// and members are reached after the leader was reaped (the group lives on in them)
// and as a zombie. A listing (Members) walks /proc for processes in a group of that
// number and then asks the kernel through the pidfd whether the group still exists: if
// it does, the number was the group's all along, and so is every process listed.
//
// Without the pidfd (pidfd_open refused: a kernel before 5.3, a seccomp filter) or the
// flag (a kernel before 6.9: EINVAL), ByNumber says why, and the group is reached by
// its number while it can be shown to be still the one its leader made: an anchor
// holds the number, the leader (or its zombie) with its recorded start time, or a
// process a listing found in the group (Members), still in it with its own start time.
// The kill reads an anchor right before kill(-pgid): a group that ends and whose
// number is handed out in between is still hit. What a member forks stays in the
// group and is known from the next listing on; members never listed before the last
// anchor ended cannot be told from a stranger's, which is why the owner lists them
// (Members) while its exited leader waits to be reaped.
//
// Either way a process with the number as its pid and another start time, a group
// found empty, or (by number) one no anchor is in any more, ends it for good: it lists
// and kills nothing from then on, and its pidfd is closed.
type Pgrp struct {
	pgid  int
	start uint64 // the leader's start time

	mu    sync.Mutex
	fd    *os.File // the leader's pidfd; nil: by number (byNum says why)
	byNum error
	child bool // NewChildPgrp's, its pidfd not opened yet: the leader is unreaped
	known []ID // the members the last listing found (at first, the leader)
	gone  bool

	// beforeSend, when set (tests), runs between Kill's check and its signal.
	beforeSend func()
}

// NewPgrp tracks the process group whose leader is leader (its pid is the group's
// number), and opens the leader's pidfd. Call it while leader cannot have been reused:
// for a child, before it is reaped. A leader whose pid names another process by now
// (another start time) makes a group that has ended. Close it once it is not needed.
func NewPgrp(leader ID) *Pgrp {
	return newPgrp(leader, true)
}

// NewChildPgrp is NewPgrp for a group whose leader is the caller's child, which the
// caller reaps only after a call of Members made once it exited (as its zombie waits):
// until then the unreaped leader holds the group's number, which names nothing else, and
// the group is reached by it; the leader's pidfd is opened at that Members, so a group
// whose leader runs costs no descriptor (the native nexlet's budget: 3 a workload).
func NewChildPgrp(leader ID) *Pgrp {
	return &Pgrp{pgid: leader.PID, start: leader.Start, known: []ID{leader}, child: true}
}

// newPgrp is NewPgrp; pidfd false reaches the group by number alone (tests).
func newPgrp(leader ID, pidfd bool) *Pgrp {
	g := &Pgrp{pgid: leader.PID, start: leader.Start, known: []ID{leader}}
	if !pidfd {
		g.byNum = errors.New("pidfd not used")
		return g
	}
	g.open()
	return g
}

// open opens the leader's pidfd. Called with mu held, or before g is shared.
func (g *Pgrp) open() {
	g.child = false
	fd, err := unix.PidfdOpen(g.pgid, 0)
	if errors.Is(err, unix.ESRCH) {
		g.end() // the leader was reaped: nothing names its group any more
		return
	}
	if err != nil {
		g.byNum = fmt.Errorf("pidfd_open %d: %w", g.pgid, err)
		return
	}
	g.fd = os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(g.pgid))
	// The pidfd pins what the pid named at the open: it is the leader if it still
	// has the leader's start time (a zombie's too).
	if st, err := ReadStat(g.pgid); err != nil || st.Start != g.start {
		g.end()
	}
}

// GroupSignals says whether this kernel signals a process group through a pidfd
// (pidfd_open, Linux 5.3, and pidfd_send_signal's PIDFD_SIGNAL_PROCESS_GROUP, 6.9): nil
// if so, else why not, and each Pgrp goes by number (ByNumber). A probe: signal 0
// through a pidfd of the caller, which sends nothing.
func GroupSignals() error {
	fd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(fd)
	// ESRCH: the caller leads no group, the flag was understood.
	err = unix.PidfdSendSignal(fd, 0, nil, unix.PIDFD_SIGNAL_PROCESS_GROUP)
	if err != nil && err != unix.ESRCH {
		return fmt.Errorf("pidfd_send_signal with PIDFD_SIGNAL_PROCESS_GROUP (Linux 6.9) refused: %w", err)
	}
	return nil
}

// ByNumber says why the group is reached by its number (kill(-pgid) after an anchor's
// check) rather than through its leader's pidfd, or nil while it is not: the owner logs
// it (a host whose kernel lacks PIDFD_SIGNAL_PROCESS_GROUP, Linux 6.9, or pidfds).
func (g *Pgrp) ByNumber() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.byNum
}

// Close ends the group's tracking: nothing is listed or killed from then on, and its
// pidfd is closed.
func (g *Pgrp) Close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.end()
}

// PGID is the group's number.
func (g *Pgrp) PGID() int { return g.pgid }

// Gone reports whether the group is known to have ended (nothing is listed or killed
// any more).
func (g *Pgrp) Gone() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.gone
}

// Members lists the group's live processes (not zombies: Stat.Runs), one walk of
// /proc, and remembers them as anchors (for a group reached by number), so that the
// group is still recognised once its leader is reaped. None once the group ended. An
// error (/proc unreadable) changes nothing.
func (g *Pgrp) Members() ([]int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gone {
		return nil, nil
	}
	if g.child {
		g.open() // the caller's child, not reaped before this call
		if g.gone {
			return nil, nil
		}
	}
	ours, reused := false, false
	var in []ID
	var live []int
	err := eachPid(func(pid int) bool {
		// getpgid first, a system call: a stat file is generated on each read, and
		// one of every process cost a millisecond a listing on a quiet host.
		if pg, err := unix.Getpgid(pid); pid != g.pgid && (err != nil || pg != g.pgid) {
			return true
		}
		st, err := ReadStat(pid)
		if err != nil {
			return true // ended meanwhile
		}
		if pid == g.pgid {
			if st.Start != g.start {
				// The number was free since: the group ended, and any group by
				// that number now is another's.
				reused, in = true, nil
				return false
			}
			ours = true
		}
		if st.PGRP != g.pgid {
			return true
		}
		id := ID{PID: pid, Start: st.Start}
		in = append(in, id)
		ours = ours || slices.Contains(g.known, id)
		if st.Runs() {
			live = append(live, pid)
		}
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("process group %d: %w", g.pgid, err)
	}
	if !reused {
		// Asked after the walk: a group that still exists held its number all
		// through it, so whatever the walk found in a group by that number is its
		// own. One that ended never comes back.
		if handled, err := g.signal(0); handled {
			ours = !errors.Is(err, unix.ESRCH)
		}
	}
	if reused || !ours || len(live) == 0 {
		// Empty (its number may be handed out from now on), or not this group.
		g.end()
		return nil, nil
	}
	g.known = in
	return live, nil
}

// Alive reports whether the group is still this one and holds a process (a zombie
// too), without a walk of /proc: through the leader's pidfd, or by number while an
// anchor still holds it. A group that is not, ends for good.
func (g *Pgrp) Alive() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gone {
		return false
	}
	if handled, err := g.signal(0); handled {
		if errors.Is(err, unix.ESRCH) {
			g.end()
			return false
		}
		return true
	}
	if !g.anchored() {
		return false
	}
	if err := unix.Kill(-g.pgid, 0); errors.Is(err, unix.ESRCH) {
		g.end()
		return false
	}
	return true
}

// LeaderRuns reports whether the leader still runs (not a zombie) in its group.
func (g *Pgrp) LeaderRuns() bool {
	st, err := ReadStat(g.pgid)
	return err == nil && st.Start == g.start && st.PGRP == g.pgid && st.Runs()
}

// Kill sends SIGKILL to the group as one (what a member forks meanwhile goes too):
// through the leader's pidfd, which names the group and never a stranger's that got its
// number; by number (kill(-pgid)) only once an anchor, read right before the kill,
// shows the number is still held by this group. It reports whether it did; a group
// that ended, or is not this one any more, is left alone.
func (g *Pgrp) Kill() (bool, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gone {
		return false, nil
	}
	hook := g.beforeSend
	if g.fd != nil {
		if hook != nil {
			hook()
			hook = nil
		}
		if handled, err := g.signal(unix.SIGKILL); handled {
			return g.sent(err)
		}
		// The kernel does not know the flag: by number from now on.
	}
	if !g.anchored() {
		return false, nil
	}
	if hook != nil {
		hook()
	}
	return g.sent(unix.Kill(-g.pgid, unix.SIGKILL))
}

// sent is Kill's answer to the signal's error.
func (g *Pgrp) sent(err error) (bool, error) {
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ESRCH):
		g.end()
		return false, nil
	}
	return false, fmt.Errorf("kill process group %d: %w", g.pgid, err)
}

// signal sends sig to the group through the leader's pidfd. handled is false where
// there is none, or the kernel refuses PIDFD_SIGNAL_PROCESS_GROUP (before Linux 6.9:
// EINVAL; ENOSYS, or a seccomp filter's EPERM, which kill(2) would return too where it
// is a lack of permission): the pidfd is closed and the caller goes by number. Called
// with mu held.
func (g *Pgrp) signal(sig unix.Signal) (handled bool, err error) {
	if g.fd == nil {
		return false, nil
	}
	rc, err := g.fd.SyscallConn()
	if err != nil {
		return true, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.PidfdSendSignal(int(fd), sig, nil, unix.PIDFD_SIGNAL_PROCESS_GROUP)
	}); err != nil {
		return true, err
	}
	if serr == unix.EINVAL || serr == unix.ENOSYS || serr == unix.EPERM {
		g.byNum = fmt.Errorf("pidfd_send_signal with PIDFD_SIGNAL_PROCESS_GROUP (Linux 6.9) refused: %w", serr)
		g.fd.Close()
		g.fd = nil
		return false, nil
	}
	return true, serr
}

// anchored reports whether the leader (its zombie too) or a known member still holds
// the group's number: the same process (start time) and, for a member, still in the
// group. Otherwise the group ended. Called with mu held.
func (g *Pgrp) anchored() bool {
	if g.gone {
		return false
	}
	if st, err := ReadStat(g.pgid); err == nil {
		if st.Start != g.start {
			g.end() // the number went to another process: the group ended before
			return false
		}
		return true // the leader still holds its number
	}
	for _, id := range g.known {
		if st, err := ReadStat(id.PID); err == nil && st.Start == id.Start && st.PGRP == g.pgid {
			return true
		}
	}
	g.end()
	return false
}

func (g *Pgrp) end() {
	g.gone, g.known = true, nil
	if g.fd != nil {
		g.fd.Close()
		g.fd = nil
	}
}

// eachPid calls fn with the pid of every process of the host (one getdents walk of
// /proc: os.ReadDir's entries and sort are not needed), until fn returns false.
func eachPid(fn func(pid int) bool) error {
	dfd, err := unix.Open("/proc", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /proc: %w", err)
	}
	defer unix.Close(dfd)
	dents := make([]byte, 16<<10)
	for {
		n, err := unix.Getdents(dfd, dents)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read /proc: %w", err)
		}
		if n <= 0 {
			return nil
		}
		for b := dents[:n]; len(b) >= 19; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(b[16]) | int(b[17])<<8
			if reclen < 19 || reclen > len(b) {
				break
			}
			name := b[19:reclen]
			if k := bytes.IndexByte(name, 0); k >= 0 {
				name = name[:k]
			}
			b = b[reclen:]
			if pid, ok := atou(name); ok && pid > 0 && pid < 1<<31 && !fn(int(pid)) {
				return nil
			}
		}
	}
}
