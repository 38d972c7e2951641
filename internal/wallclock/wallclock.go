// Package wallclock waits for a time of the wall clock. NATS users expire by the
// server's wall clock, but Go's timers run on the monotonic clock, which stands still
// while the host or its VM is suspended or paused: after the resume the wall clock is
// stepped ahead, and one timer set for the whole wait fires past the expiry (a paused CI
// VM's clock jumped 32 s: a nexlet's user expired with 18 s of its renewal timer to go).
// So a wait is cut into slices and the wall clock read after each: a step costs at most
// one slice. Used by the nexlets' renewals of their own user and of their workloads'.
package wallclock

import (
	"context"
	"sync"
	"time"
)

// Slice is the slice for a wait that must end before a deadline margin after its time:
// a quarter of the margin, at least 1 s (a step then leaves three quarters of it).
func Slice(margin time.Duration) time.Duration {
	return max(time.Second, margin/4)
}

// Timer calls its function once the wall clock reads a time (AfterFunc).
type Timer struct {
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

// AfterFunc calls f in its own goroutine once now (the wall clock: time.Now) reads at or
// later, waiting in monotonic timers of at most slice each. at's monotonic reading, if
// any, is dropped: the wait is by the wall clock.
func AfterFunc(at time.Time, slice time.Duration, now func() time.Time, f func()) *Timer {
	at = at.Round(0)
	w := &Timer{}
	var check func()
	check = func() {
		d := at.Sub(now())
		w.mu.Lock()
		if w.stopped {
			w.mu.Unlock()
			return
		}
		if d > 0 {
			w.t = time.AfterFunc(min(d, slice), check)
			w.mu.Unlock()
			return
		}
		w.stopped = true
		w.mu.Unlock()
		f()
	}
	w.mu.Lock()
	w.t = time.AfterFunc(min(max(at.Sub(now()), 0), slice), check)
	w.mu.Unlock()
	return w
}

// Stop keeps f from being called, if it has not been yet; false when it was called or
// the timer already stopped.
func (w *Timer) Stop() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return false
	}
	w.stopped = true
	w.t.Stop()
	return true
}

// Until waits until now (the wall clock) reads at, or ctx ends (false).
func Until(ctx context.Context, at time.Time, slice time.Duration, now func() time.Time) bool {
	if !at.Round(0).After(now()) {
		return true
	}
	due := make(chan struct{})
	t := AfterFunc(at, slice, now, func() { close(due) })
	select {
	case <-ctx.Done():
		if t.Stop() {
			return false
		}
		<-due
		return true
	case <-due:
		return true
	}
}
