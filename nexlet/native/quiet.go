package native

import (
	"sync"
	"time"
)

// quietGate holds stopped workloads' tidies (their cgroup, directory, record, the uid's
// retirement, WORKLOADSTOPPED) until the nexlet has had no start or stop for a quiet
// window, at most a cap after the stop's reply. A placement loop (auction, deploy,
// list, stop, back to back) sends the next auction right after a stop's reply; the
// auction reaches nexd, not the nexlet, so startGate sees no start in flight then, and
// a tidy run at once shared the 2 cores with the auction and the deploy after it (61 %
// of the nexlet's CPU inside the auctions' windows, perf). A fixed delay only moved the
// tidy onto the next deploy; a window that each start and stop opens again puts it
// after the deploy and its workload's first line, in the idle time that follows.
//
// Under a steady stream of requests the cap ends each wait, so tidies still run,
// together; more than quietBacklog waiting run at once. A start of an id being tidied,
// a start short of dynamic uids (hurry), lame duck and shutdown (stopDeferring) end the
// waits.
type quietGate struct {
	mu      sync.Mutex
	last    time.Time     // the last start's or stop's arrival or end
	waiting int           // tidies in wait
	hurried chan struct{} // closed by hurry: the waits under way end now
	hurryAt time.Time     // the last hurry: tidies queued before it do not wait
	off     bool          // no more waits (lame duck, shutdown)

	quiet, max time.Duration
	backlog    int
	clock      gateClock
}

// gateClock is the gate's time: the real clock (realClock), or a test's, which moves
// only when the test says (a window's wait checked against the real clock depended on
// how punctually a loaded machine let the test touch).
type gateClock interface {
	Now() time.Time
	NewTimer(d time.Duration) gateTimer
}

// gateTimer is a *time.Timer as a gateClock makes it.
type gateTimer interface {
	C() <-chan time.Time
	Reset(d time.Duration) bool
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) gateTimer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.Timer.C }

// The window covers a start's workload's first line (the announcement after the reply
// is 0.6-0.9 ms p50 in compare) and the time from a stop's reply to the next deploy's
// start in a placement loop (an auction, 0.6-1.0 ms p50 in compare, and a deploy's
// hop; more under load), and fits in compare's list stall of 20 ms.
const (
	quietWindow  = 8 * time.Millisecond
	quietMax     = 200 * time.Millisecond // the longest a tidy waits after its stop's reply
	quietBacklog = 64                     // tidies waiting beyond this many run at once
)

func newQuietGate(quiet, max time.Duration, backlog int) *quietGate {
	return newQuietGateClock(quiet, max, backlog, realClock{})
}

// newQuietGateClock is newQuietGate on clock.
func newQuietGateClock(quiet, max time.Duration, backlog int, clock gateClock) *quietGate {
	return &quietGate{quiet: quiet, max: max, backlog: backlog, hurried: make(chan struct{}), clock: clock}
}

// touch says a start or a stop arrived or ended: the quiet window begins again.
func (q *quietGate) touch() {
	now := q.clock.Now()
	q.mu.Lock()
	if now.After(q.last) {
		q.last = now
	}
	q.mu.Unlock()
}

// wait returns once the window since the last touch passed with none, max after
// since (when the tidy was queued), at once when more than backlog wait, or when
// hurried (after since) or stopped deferring.
func (q *quietGate) wait(since time.Time) {
	q.mu.Lock()
	q.waiting++
	defer func() {
		q.waiting--
		q.mu.Unlock()
	}()
	var t gateTimer
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	for !q.off && q.waiting <= q.backlog && since.After(q.hurryAt) {
		due := q.last.Add(q.quiet)
		if end := since.Add(q.max); end.Before(due) {
			due = end
		}
		d := due.Sub(q.clock.Now())
		if d <= 0 {
			return
		}
		hurried := q.hurried
		q.mu.Unlock()
		if t == nil {
			t = q.clock.NewTimer(d)
		} else {
			t.Reset(d)
		}
		select {
		case <-t.C():
		case <-hurried:
			q.mu.Lock()
			return
		}
		q.mu.Lock()
	}
}

// hurry ends the waits of the tidies queued until now, under way or about to begin: a
// start needs what they hold.
func (q *quietGate) hurry() {
	now := q.clock.Now()
	q.mu.Lock()
	defer q.mu.Unlock()
	if !now.After(q.hurryAt) {
		now = q.hurryAt.Add(time.Nanosecond)
	}
	q.hurryAt = now
	if q.waiting > 0 {
		close(q.hurried)
		q.hurried = make(chan struct{})
	}
}

// stopDeferring ends every wait, now and from now on: the nexlet drains or closes.
func (q *quietGate) stopDeferring() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.off {
		return
	}
	q.off = true
	close(q.hurried)
	q.hurried = make(chan struct{})
}
