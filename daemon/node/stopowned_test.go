package node

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// TestNoGoroutineAfterStop: a handler still running when Stop unsubscribed (NATS does
// not wait for it) schedules a revocation once Stop waits or has returned. Before,
// after() added to the WaitGroup Stop waits on and started the goroutine anyway: an
// Add at zero concurrent with Stop's Wait (WaitGroup misuse: the Wait may return
// first, or panic), and the revocation ran after Stop returned, about half the time
// (its wait and the node's cancelled context both ready). Now nothing starts.
func TestNoGoroutineAfterStop(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	var ran atomic.Int32
	for range 100 {
		n.after(0, "agent_id", "late", func(context.Context) error { ran.Add(1); return nil })
	}
	time.Sleep(200 * time.Millisecond)
	if k := ran.Load(); k != 0 {
		t.Errorf("%d of 100 revocations scheduled after Stop ran after it returned", k)
	}
}
