package procid

import (
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
// So a Pgrp lists and kills the group only while it can show the group is still the
// one its leader made: the leader (or its zombie) still holds the number with its
// recorded start time, or a process the last listing found in the group is still in it
// with its own start time (it held the number meanwhile). A process with the number as
// its pid and another start time, a group found empty, or one nothing known is in any
// more, ends it for good: it lists and kills nothing from then on. What a member forks
// stays in the group and is known from the next listing on; members the owner never
// listed before the leader was reaped cannot be told from a stranger's, which is why
// the owner lists them (Members) while the exited leader waits to be reaped.
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

// Members lists the group's live processes (not zombies), and remembers them, so that
// the group is still recognised once its leader is reaped. None once the group ended.
// An error (/proc unreadable) leaves what it knew as it was.
func (g *Pgrp) Members() ([]int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	live, err := g.scan()
	if err != nil {
		return nil, err
	}
	out := make([]int, len(live))
	for i, id := range live {
		out[i] = id.PID
	}
	return out, nil
}

// Kill sends SIGKILL to the group once it has shown the group is still this one: a
// live member the listing found is read again right before the kill, still that
// process (its start time) and still in the group, so the number is held by this group
// and cannot name another; then the group is killed as one (kill(-pgid): what a member
// forks meanwhile goes too). It returns the members listed. A group that ended, or is
// not this one any more, is left alone.
func (g *Pgrp) Kill() ([]int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	live, err := g.scan()
	if err != nil || len(live) == 0 {
		return nil, err
	}
	var errs []error
	for _, id := range live {
		ok, err := g.killVia(id)
		if ok {
			out := make([]int, len(live))
			for i, id := range live {
				out[i] = id.PID
			}
			return out, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...) // every member ended meanwhile (or could not be pinned)
}

// scan walks /proc once: the group's members (zombies too: they still hold the
// number) and the process holding its number as pid. Called with mu held.
func (g *Pgrp) scan() ([]ID, error) {
	if g.gone {
		return nil, nil
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("process group %d: %w", g.pgid, err)
	}
	ours := false
	var in, live []ID
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := ReadStat(pid)
		if err != nil {
			continue // ended meanwhile
		}
		if pid == g.pgid {
			if st.Start != g.start {
				// The number was free since: the group ended, and any group by
				// that number now is another's.
				g.end()
				return nil, nil
			}
			ours = true
		}
		if st.PGRP != g.pgid {
			continue
		}
		id := ID{PID: pid, Start: st.Start}
		in = append(in, id)
		ours = ours || slices.Contains(g.known, id)
		if st.State != 'Z' && st.State != 'X' {
			live = append(live, id)
		}
	}
	if !ours || len(live) == 0 {
		// Empty (its number may be handed out from now on), or only processes of
		// which none is known to have held the number since the last listing.
		g.end()
		return nil, nil
	}
	g.known = in
	return live, nil
}

func (g *Pgrp) end() { g.gone, g.known = true, nil }

// killVia kills the group if its member id is still that process, alive and in the
// group (so that the group's number names this group); ok says it did.
func (g *Pgrp) killVia(id ID) (ok bool, err error) {
	st, err := ReadStat(id.PID)
	if err != nil || st.Start != id.Start || st.PGRP != g.pgid || st.State == 'Z' || st.State == 'X' {
		return false, nil // ended, or left the group, meanwhile
	}
	if err := unix.Kill(-g.pgid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return false, fmt.Errorf("kill process group %d: %w", g.pgid, err)
	}
	return true, nil
}
