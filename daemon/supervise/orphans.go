package supervise

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/nexd-project/nexd/internal/procexit"
	"github.com/nexd-project/nexd/internal/procid"
)

// A workload whose nexlet dies is reparented to the nearest child subreaper: nexd, when
// nexd started that nexlet. A nexlet adopted from an earlier nexd (live_restore) is not
// nexd's child, so when it dies its workloads go to init, which reaps them: their exit
// statuses never reach nexd's reaper. orphanWatch learns them anyway from the kernel's
// process events (cn_proc): it keeps the recorded workload processes (pid and start
// time, Options.Workloads' records) and writes the exit record of any of them that ends
// with a parent that is neither nexd nor a nexlet, as the reaper does for its own
// children. The nexlet that adopts the workload reads it there.
type orphanWatch struct {
	log   *slog.Logger
	exits string
	list  func() []procid.ID
	mine  func(pid int) bool // nexd or a running nexlet: that parent reaps and reports it
	l     *procexit.Listener

	mu     sync.Mutex
	watch  map[int]uint64 // pid -> start time of recorded live workload processes
	recent []recentExit   // exits of the last recentFor, for processes that ended before a refresh saw them
	// pending are recorded processes a refresh found ended before their exit event was
	// read (still in the socket): the event, when it comes within recentFor, is theirs.
	pending map[int]pendingEnd
	// gone are nexlets that died (pid -> when, kept recentFor): a workload that ended
	// while its nexlet was being killed has that nexlet as its parent in the event, but
	// init, not the nexlet, reaps it.
	gone map[int]time.Time
}

type pendingEnd struct {
	start uint64
	until time.Time
}

type recentExit struct {
	exit procexit.Exit
	at   time.Time
	// start is the recorded start time when the process was a watched workload whose
	// parent was a running nexlet (0 otherwise): nexletGone records it if that nexlet
	// dies before it could have reaped it.
	start uint64
}

// recentFor is how long an exit is kept for a refresh that comes after it (the refresh
// after a nexlet's death races with its workloads' exits).
const recentFor = 5 * time.Second

// orphanWatchWait bounds how long an adoption waits to know whether process events work
// (Listen's probe).
const orphanWatchWait = 5 * time.Second

// recentMax bounds that memory on a host where many processes end.
const recentMax = 4096

func newOrphanWatch(log *slog.Logger, exits string, list func() []procid.ID, mine func(int) bool) (*orphanWatch, error) {
	l, err := procexit.Listen()
	if err != nil {
		return nil, err
	}
	return &orphanWatch{log: log, exits: exits, list: list, mine: mine, l: l, watch: map[int]uint64{}}, nil
}

// refresh takes the recorded workload processes again: the live ones are watched; one
// that already ended is recorded from the recent exits.
func (w *orphanWatch) refresh() {
	ids := w.list()
	watch := make(map[int]uint64, len(ids))
	var ended []procid.ID
	for _, id := range ids {
		if id.Alive() {
			watch[id.PID] = id.Start
		} else {
			ended = append(ended, id)
		}
	}
	w.mu.Lock()
	w.watch = watch
	var late []struct {
		id procid.ID
		ex procexit.Exit
	}
	until := time.Now().Add(recentFor)
	for _, id := range ended {
		found := false
		for _, r := range w.recent {
			if r.exit.PID == id.PID {
				found = true
				late = append(late, struct {
					id procid.ID
					ex procexit.Exit
				}{id, r.exit})
			}
		}
		if !found {
			if w.pending == nil {
				w.pending = map[int]pendingEnd{}
			}
			w.pending[id.PID] = pendingEnd{start: id.Start, until: until}
		}
	}
	w.mu.Unlock()
	for _, x := range late {
		w.record(x.id, x.ex)
	}
}

// run reads process exits until ctx ends.
func (w *orphanWatch) run(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() { w.l.Close() })
	defer stop()
	lost := 0
	for {
		ex, err := w.l.Next()
		if errors.Is(err, procexit.ErrLost) {
			if lost++; lost == 1 || lost%100 == 0 {
				w.log.Warn("process exit events were dropped by the kernel; an orphaned workload's exit code may be unknown", "times", lost)
			}
			continue
		}
		if err != nil {
			return
		}
		now := time.Now()
		// A nexlet parent reaps and reports the exit unless it is dying itself (killed:
		// then init reaps it). Which one shows only when nexd sees the nexlet end.
		byNexlet := ex.Parent != os.Getpid() && w.mine(ex.Parent)
		w.mu.Lock()
		start, watched := w.watch[ex.PID]
		if p, ok := w.pending[ex.PID]; ok && !watched && now.Before(p.until) {
			start, watched = p.start, true
		}
		for pid, p := range w.pending {
			if pid == ex.PID || now.After(p.until) {
				delete(w.pending, pid)
			}
		}
		for pid, at := range w.gone {
			if now.Sub(at) > recentFor {
				delete(w.gone, pid)
			}
		}
		_, parentGone := w.gone[ex.Parent]
		write := watched && (!byNexlet || parentGone)
		if watched {
			delete(w.watch, ex.PID)
		}
		if !write {
			for len(w.recent) > 0 && (len(w.recent) >= recentMax || now.Sub(w.recent[0].at) > recentFor) {
				w.recent = w.recent[1:]
			}
			r := recentExit{exit: ex, at: now}
			if watched {
				r.start = start
			}
			w.recent = append(w.recent, r)
		}
		w.mu.Unlock()
		if write {
			w.write(procid.ID{PID: ex.PID, Start: start}, ex)
		}
	}
}

// nexletGone is told that the nexlet with this pid ended: the watched workloads that
// ended with it as their parent shortly before (their exit events read, or still to be
// read) were reaped by init, not by it, unless it reaped them before it died; their
// exits are recorded (a record the nexlet's reaping made redundant says the same).
func (w *orphanWatch) nexletGone(pid int) {
	now := time.Now()
	var orphans []recentExit
	w.mu.Lock()
	if w.gone == nil {
		w.gone = map[int]time.Time{}
	}
	w.gone[pid] = now
	for _, r := range w.recent {
		if r.start != 0 && r.exit.Parent == pid && now.Sub(r.at) <= recentFor {
			orphans = append(orphans, r)
		}
	}
	w.mu.Unlock()
	for _, r := range orphans {
		w.write(procid.ID{PID: r.exit.PID, Start: r.start}, r.exit)
	}
}

// record writes the exit record of a workload process whose parent cannot report it.
func (w *orphanWatch) record(id procid.ID, ex procexit.Exit) {
	if w.mine(ex.Parent) {
		return // nexd's reaper or the nexlet reaps it and knows
	}
	w.write(id, ex)
}

// write writes the exit record of a workload process unless one exists.
func (w *orphanWatch) write(id procid.ID, ex procexit.Exit) {
	if _, err := procid.ReadExit(w.exits, id); err == nil {
		return
	}
	e := procid.ExitOf(ex.Status)
	if err := procid.WriteExit(w.exits, id, e); err != nil {
		w.log.Warn("cannot record the exit of an orphaned workload", "pid", id.PID, "err", err)
		return
	}
	w.log.Info("recorded the exit of a workload reparented to init (its nexlet had died)", "pid", id.PID, "parent", ex.Parent, "exit_code", e.Code, "reason", e.Reason)
}
