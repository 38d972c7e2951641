package nexlet

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
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

// TestRetireAtShutdownAnswersWhatItTook: a connection the nexlet moved away from
// (renewSelf) is retired once the requests it took are answered, and so it is when
// the runner shuts down meanwhile: Shutdown waits for those requests, and their replies
// must leave on the connection that took them. Before, the retirement stopped waiting
// at the runner's end and drained the connection at once: a start taken on the old
// connection and answered after it (a slow one, a renewal's retirement lasts up to
// 30 s) lost its reply, and the node gave up on a deploy that ran.
func TestRetireAtShutdownAnswersWhatItTook(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	old, client := testnats.Connect(t, s), testnats.Connect(t, s)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	r, err := NewRunner(ctx, "NODE1", &memAgent{}, WithShutdownWait(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	busy := new(atomic.Int64)
	taken, release := make(chan struct{}), make(chan struct{})
	svc, err := micro.AddService(old, micro.Config{Name: "retire", Version: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.AddEndpoint("start", r.async(old, busy, func(req micro.Request) {
		close(taken)
		<-release
		_ = req.Respond([]byte("started"))
	}), micro.WithEndpointSubject("test.start")); err != nil {
		t.Fatal(err)
	}
	if err := old.Flush(); err != nil { // the endpoint at the server before the request
		t.Fatal(err)
	}
	reply := make(chan *nats.Msg, 1)
	go func() {
		m, err := client.Request("test.start", nil, time.Minute)
		if err != nil {
			t.Logf("request: %v", err)
		}
		reply <- m
	}()
	select {
	case <-taken:
	case <-time.After(30 * time.Second):
		t.Fatal("the request was not taken")
	}
	_ = svc.Stop() // the switch: the old connection takes no more
	cancel()       // the runner shuts down
	retired := make(chan struct{})
	go func() { r.retire(ctx, old, busy, time.Time{}); close(retired) }()
	// Before: retired at once, the connection drained and closed within this wait.
	testkit.WaitFor(2*time.Second, old.IsClosed)
	close(release)
	select {
	case m := <-reply:
		if m == nil || string(m.Data) != "started" {
			t.Fatalf("the reply of the request the retired connection took: %v", m)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no reply within 30 s")
	}
	select {
	case <-retired:
	case <-time.After(30 * time.Second):
		t.Fatal("the retirement did not end once the request was answered")
	}
	r.work.Wait()
}
