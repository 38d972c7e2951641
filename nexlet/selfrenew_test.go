package nexlet

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/wallclock"
)

// TestRenewalWaitFollowsWallClockStep: the wait for the nexlet's self-renewal follows
// a step of the wall clock, by which the server expires the user. A host or VM resumed
// from a pause steps its wall clock ahead while the monotonic clock, which timers use,
// stood still; the host's clock is shared, so the step is made in the clock the wait
// reads. Before, one timer ran for the whole wait: in a CI whose VM was paused 32 s,
// e2e TestStolenNexletUser saw the nexlet's user expire with 18 s of that timer to go
// (here: still waiting an hour after the step).
func TestRenewalWaitFollowsWallClockStep(t *testing.T) {
	var step atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(step.Load())) }
	done := make(chan bool, 1)
	go func() { done <- wallclock.Until(t.Context(), now().Add(time.Hour), 100*time.Millisecond, now) }()
	select {
	case <-done:
		t.Fatal("the wait ended an hour before its time")
	case <-time.After(300 * time.Millisecond):
	}
	step.Store(int64(time.Hour))
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("the wait reports its context ended")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still waiting 10 s after the wall clock stepped past the renewal time")
	}

	if !wallclock.Until(t.Context(), now().Add(-time.Second), time.Minute, now) {
		t.Fatal("a renewal time already past is not due")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if wallclock.Until(ctx, now().Add(time.Hour), time.Minute, now) {
		t.Fatal("the wait ended with its context but reports the renewal due")
	}
}
