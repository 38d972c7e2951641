package procid

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
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
// So a Pgrp reaches the group only while it can show the group is still the one its
// leader made: an anchor holds the number, the leader (or its zombie) with its recorded
// start time, or a process a listing found in the group (Members), still in it with its
// own start time. A process with the number as its pid and another start time, a group
// found empty, or one no anchor is in any more, ends it for good: it lists and kills
// nothing from then on. What a member forks stays in the group and is known from the
// next listing on; members never listed before the last anchor ended cannot be told
// from a stranger's, which is why the owner lists them (Members) while its exited
// leader waits to be reaped.
type Pgrp struct {
	pgid  int
	start uint64 // the leader's start time

	mu    sync.Mutex
	known []ID // the members the last listing found (at first, the leader)
	gone  bool
}

// NewPgrp tracks the process group whose leader is leader (its pid is the group's
// number). Call it while leader cannot have been reused: for a child, before it is
// reaped.
func NewPgrp(leader ID) *Pgrp {
	return &Pgrp{pgid: leader.PID, start: leader.Start, known: []ID{leader}}
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

// Members lists the group's live processes (not zombies: Stat.Runs), one walk of /proc, and
// remembers them as anchors, so that the group is still recognised once its leader is
// reaped. None once the group ended. An error (/proc unreadable) changes nothing.
func (g *Pgrp) Members() ([]int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gone {
		return nil, nil
	}
	ours := false
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
				ours, in = false, nil
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
	if !ours || len(live) == 0 {
		// Empty (its number may be handed out from now on), or no anchor in it.
		g.end()
		return nil, nil
	}
	g.known = in
	return live, nil
}

// Alive reports whether the group is still this one and holds a process, without a
// walk of /proc: an anchor still holds the number, and the group is not empty. A
// group that is not, ends for good.
func (g *Pgrp) Alive() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
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

// Kill sends SIGKILL to the group as one (kill(-pgid): what a member forks meanwhile
// goes too), once an anchor, read right before the kill, shows the number is still
// held by this group and cannot name another. It reports whether it did; a group that
// ended, or is not this one any more, is left alone.
func (g *Pgrp) Kill() (bool, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.anchored() {
		return false, nil
	}
	if err := unix.Kill(-g.pgid, unix.SIGKILL); err != nil {
		if errors.Is(err, unix.ESRCH) {
			g.end()
			return false, nil
		}
		return false, fmt.Errorf("kill process group %d: %w", g.pgid, err)
	}
	return true, nil
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

func (g *Pgrp) end() { g.gone, g.known = true, nil }

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
