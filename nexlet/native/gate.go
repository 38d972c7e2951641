package native

import (
	"sync"
	"time"
)

// startGate counts the starts in flight, so that work left for later (a stopped
// workload's leftovers, uid releases) can wait for a moment when none runs. On a small
// machine that work otherwise delays the next deploy: it competes for the cores, and
// in cgroup v1 removing a group and forking into one take the same kernel lock.
type startGate struct {
	mu   sync.Mutex
	n    int
	idle chan struct{} // closed when n drops to 0
}

func (g *startGate) enter() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n == 0 {
		g.idle = make(chan struct{})
	}
	g.n++
}

func (g *startGate) leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n--; g.n == 0 {
		close(g.idle)
	}
}

// yield waits until no start is in flight, at most max: under a steady stream of
// starts the later work still gets done.
func (g *startGate) yield(max time.Duration) {
	g.mu.Lock()
	if g.n == 0 {
		g.mu.Unlock()
		return
	}
	idle := g.idle
	g.mu.Unlock()
	t := time.NewTimer(max)
	defer t.Stop()
	select {
	case <-idle:
	case <-t.C:
	}
}

// tidyYield bounds each wait of later work for the starts in flight.
const tidyYield = 10 * time.Millisecond
