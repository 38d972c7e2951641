package wallclock

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestAfterFuncFollowsWallClockStep: a timer set an hour ahead fires within a slice of
// the wall clock (the clock it reads) stepping past its time, and once only; a stopped
// one never fires.
func TestAfterFuncFollowsWallClockStep(t *testing.T) {
	var step atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(step.Load())) }
	var fired atomic.Int32
	due := make(chan struct{}, 2)
	w := AfterFunc(now().Add(time.Hour), 50*time.Millisecond, now, func() { fired.Add(1); due <- struct{}{} })
	stopped := AfterFunc(now().Add(time.Hour), 50*time.Millisecond, now, func() { t.Error("a stopped timer fired") })
	time.Sleep(200 * time.Millisecond)
	if fired.Load() != 0 {
		t.Fatal("fired an hour before its time")
	}
	if !stopped.Stop() {
		t.Fatal("Stop of a pending timer says it was not pending")
	}
	step.Store(int64(time.Hour))
	select {
	case <-due:
	case <-time.After(10 * time.Second):
		t.Fatal("still waiting 10 s after the wall clock stepped past its time")
	}
	time.Sleep(200 * time.Millisecond)
	if n := fired.Load(); n != 1 {
		t.Fatalf("fired %d times, want 1", n)
	}
	if w.Stop() {
		t.Error("Stop of a fired timer says it was pending")
	}

	past := make(chan struct{})
	AfterFunc(now().Add(-time.Minute), time.Hour, now, func() { close(past) })
	select {
	case <-past:
	case <-time.After(10 * time.Second):
		t.Fatal("a time already past did not fire")
	}
}

// BenchmarkAfterFuncStop is what a deploy and a stop of a workload with an expiring
// user pay to arm and stop its renewal, beside one monotonic timer (the native nexlet's
// before).
func BenchmarkAfterFuncStop(b *testing.B) {
	at := time.Now().Add(time.Hour)
	b.Run("wallclock", func(b *testing.B) {
		for b.Loop() {
			AfterFunc(at, Slice(12*time.Minute), time.Now, func() {}).Stop()
		}
	})
	b.Run("time", func(b *testing.B) {
		for b.Loop() {
			time.AfterFunc(time.Until(at), func() {}).Stop()
		}
	})
}
