package native

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
)

// oomGate gives a workload its oom_score_adj from its birth: the nexlet raises its own
// to the workload's while it forks one, and lowers it again once the fork returned.
// A process inherits its parent's oom_score_adj, and the minimum it may lower its own
// to without CAP_SYS_RESOURCE, when it is forked. Raised after the fork (as it was),
// what the workload forked before that kept the nexlet's lower value (-500 under
// nexd), and the minimum with it; a write to the workload cannot reach them. Written
// by a nexlet holding CAP_SYS_RESOURCE (root, as deployed), the raise sets the
// nexlet's minimum too, which the workload inherits: it cannot lower its own again.
// Without that capability the minimum stays the nexlet's, and the workload may lower
// its own back to it (README: Security). The cost: the nexlet runs with its
// workloads' value while a fork is under way (about a millisecond each).
type oomGate struct {
	mu       sync.Mutex
	f        *os.File // /proc/self/oom_score_adj (open)
	inFlight int      // forks under way
	own      int      // the nexlet's value, read when the first of them began
	v        int      // the workloads' value
	raised   bool     // the nexlet runs with v now (or own == v)
	known    bool     // own and v were read
	closed   bool
}

// workloadOOMScore is a workload's oom_score_adj under a nexlet with own: the default 0
// when nexd lowered the nexlet's, else 100 above it, so that under memory pressure the
// kernel kills a workload before the nexlet watching all of them.
func workloadOOMScore(own int) int {
	if own < 0 {
		return 0
	}
	return min(own+100, 1000)
}

// enter begins a fork: from its return until leave the nexlet's forks are born with
// the workloads' value. It returns that value, and whether the nexlet could not raise
// its own to it (the fork must then be raised after, as before: fallback), or -1 when
// the nexlet's own value is unknown.
func (g *oomGate) enter(log *slog.Logger) (v int, fallback bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inFlight == 0 {
		g.known, g.raised = false, false
		if err := g.readOwn(); err != nil {
			log.Debug("own oom_score_adj unreadable; workloads keep the nexlet's", "err", err)
		} else {
			g.known = true
			g.v = workloadOOMScore(g.own)
			g.raised = g.own == g.v
			if !g.raised {
				if err := g.write(g.v); err != nil {
					log.Debug("cannot raise own oom_score_adj for a fork; the workload's is raised after it", "value", g.v, "err", err)
				} else {
					g.raised = true
				}
			}
		}
	}
	g.inFlight++
	if !g.known {
		return -1, false
	}
	return g.v, !g.raised
}

// leave ends a fork begun by enter; the last one lowers the nexlet's value again.
func (g *oomGate) leave(log *slog.Logger) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inFlight--
	if g.inFlight > 0 || !g.known || !g.raised || g.own == g.v {
		return
	}
	if err := g.write(g.own); err != nil {
		log.Warn("cannot lower own oom_score_adj again after a fork", "value", g.own, "err", err)
	}
}

// open opens the nexlet's own oom_score_adj, once, before any workload is forked (so
// that the descriptor is the nexlet's, not counted against its workloads). Failing, a
// fork is raised after it returned (fallback).
func (g *oomGate) open(log *slog.Logger) {
	f, err := os.OpenFile("/proc/self/oom_score_adj", os.O_RDWR, 0)
	if err != nil {
		log.Debug("own oom_score_adj not opened; workloads' are raised after their fork", "err", err)
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.f != nil || g.closed {
		_ = f.Close()
		return
	}
	g.f = f
}

func (g *oomGate) readOwn() error {
	if g.f == nil {
		return os.ErrClosed
	}
	var buf [16]byte
	k, err := g.f.ReadAt(buf[:], 0)
	if k == 0 {
		return fmt.Errorf("read %s: %w", g.f.Name(), err)
	}
	own, err := strconv.Atoi(strings.TrimSpace(string(buf[:k])))
	if err != nil {
		return fmt.Errorf("read %s: %w", g.f.Name(), err)
	}
	g.own = own
	return nil
}

func (g *oomGate) write(v int) error {
	if g.f == nil {
		return os.ErrClosed
	}
	_, err := g.f.WriteAt([]byte(strconv.Itoa(v)), 0)
	return err
}

// close closes the file; later forks keep the nexlet's value (fallback: raised after).
func (g *oomGate) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	if g.f != nil {
		_ = g.f.Close()
		g.f = nil
	}
}
