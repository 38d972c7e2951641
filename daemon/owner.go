package daemon

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// goroutines owns every goroutine the daemon starts (as nats-server's startGoRoutine):
// each is counted, and wait returns when all have ended. Once wait has begun, go refuses
// new ones, so nothing starts behind the owner's back during shutdown.
type goroutines struct {
	mu     sync.Mutex
	wg     sync.WaitGroup
	closed bool
}

// goFn runs f in a goroutine the owner waits for; false when shutting down (f not run).
func (g *goroutines) goFn(f func()) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Go(f)
	return true
}

// wait refuses new goroutines and waits for the running ones, at most timeout; it
// reports whether all ended.
func (g *goroutines) wait(timeout time.Duration) bool {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }() // ends with the last owned goroutine
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// closers is the shutdown stack: each component pushes how to close it as it comes up,
// and unwind closes them in reverse order (as containerd's Server.Stop), so whatever
// start managed to bring up is released, and nothing else.
type closers struct {
	mu      sync.Mutex
	stack   []closer
	running string // the closer unwind runs now ("" between them)
}

type closer struct {
	name string
	fn   func(context.Context) error
}

func (c *closers) push(name string, fn func(context.Context) error) {
	c.mu.Lock()
	c.stack = append(c.stack, closer{name, fn})
	c.mu.Unlock()
}

// slowCloser is how long a closer may take before unwind says it is waiting on it.
const slowCloser = 3 * time.Second

// unwind pops and runs every closer, newest first, logging failures.
func (c *closers) unwind(ctx context.Context, log *slog.Logger) {
	for {
		c.mu.Lock()
		if len(c.stack) == 0 {
			c.mu.Unlock()
			return
		}
		cl := c.stack[len(c.stack)-1]
		c.stack = c.stack[:len(c.stack)-1]
		c.running = cl.name
		c.mu.Unlock()
		// A stop that waits says on what (a NATS that is gone is the usual cause).
		slow := time.AfterFunc(slowCloser, func() {
			log.Warn("stopping: still waiting", "on", cl.name, "after", slowCloser)
		})
		err := cl.fn(ctx)
		slow.Stop()
		c.mu.Lock()
		c.running = ""
		c.mu.Unlock()
		if err != nil {
			log.Warn("stopping "+cl.name, "err", err)
		}
	}
}

// current names the closer unwind runs now, "" when none.
func (c *closers) current() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.running
}

// names lists the stack bottom to top (tests check the order).
func (c *closers) names() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, len(c.stack))
	for i, cl := range c.stack {
		out[i] = cl.name
	}
	return out
}
