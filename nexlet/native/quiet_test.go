package native

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// waitAsync runs q.wait(since) in a goroutine the test owns; the channel closes when it
// returns.
func waitAsync(t *testing.T, q *quietGate, since time.Time) <-chan struct{} {
	t.Helper()
	done := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	wg.Go(func() { q.wait(since); close(done) })
	return done
}

// TestQuietGate: a wait ends once no touch came for the window, not while touches keep
// coming; by its cap under a steady stream; at once beyond the backlog, when hurried
// (tidies queued before the hurry, also those not yet waiting) and once deferring
// stopped.
func TestQuietGate(t *testing.T) {
	t.Run("quiet window", func(t *testing.T) {
		// On the test's clock, which moves only when the test says: touches 25 ms apart
		// for 300 ms, then none. With the real clock a loaded machine could delay the
		// test past the window between two touches (the gate then rightly ended its
		// wait) in each of its 20 attempts (load ~20); the wait must not end while
		// touches keep coming, nor 1 ns before the window after the last, and must end
		// at it.
		const window, step = 60 * time.Millisecond, 25 * time.Millisecond
		clk := newTestClock()
		q := newQuietGateClock(window, time.Hour, 64, clk)
		q.touch()
		done := waitAsync(t, q, clk.Now())
		if clk.settle(t, done) {
			t.Fatal("the wait ended at once after a touch")
		}
		for i := 1; i <= 12; i++ {
			clk.advance(step)
			if clk.settle(t, done) {
				t.Fatalf("the wait ended %v after the first touch, while touches kept coming %v apart", time.Duration(i)*step, step)
			}
			q.touch()
		}
		clk.advance(window - time.Nanosecond)
		if clk.settle(t, done) {
			t.Fatalf("the wait ended %v after the last touch, before the window", window-time.Nanosecond)
		}
		clk.advance(time.Nanosecond)
		if !clk.settle(t, done) {
			t.Fatal("the wait did not end once the window after the last touch passed")
		}
	})
	t.Run("cap", func(t *testing.T) {
		q := newQuietGate(time.Hour, 150*time.Millisecond, 64)
		q.touch()
		since := time.Now()
		done := waitAsync(t, q, since)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() { // requests keep coming, never quiet
			for {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
					q.touch()
				}
			}
		})
		defer func() { close(stop); wg.Wait() }()
		select {
		case <-done:
		case <-time.After(waitLong):
			t.Fatal("the wait outlived its cap under a steady stream of touches")
		}
		if d := time.Since(since); d < 150*time.Millisecond {
			t.Errorf("the wait ended after %v, before its cap, while touches kept coming", d)
		}
	})
	t.Run("backlog", func(t *testing.T) {
		q := newQuietGate(time.Hour, time.Hour, 2)
		q.touch()
		a, b := waitAsync(t, q, time.Now()), waitAsync(t, q, time.Now())
		testkit.Eventually(t, "two waiting", func() bool { q.mu.Lock(); defer q.mu.Unlock(); return q.waiting == 2 })
		q.wait(time.Now()) // the third goes at once
		select {
		case <-a:
			t.Fatal("a wait within the backlog ended")
		case <-b:
			t.Fatal("a wait within the backlog ended")
		default:
		}
		q.stopDeferring()
		<-a
		<-b
	})
	t.Run("hurry", func(t *testing.T) {
		q := newQuietGate(time.Hour, time.Hour, 64)
		q.touch()
		early := time.Now()
		waiting := waitAsync(t, q, early)
		testkit.Eventually(t, "one waiting", func() bool { q.mu.Lock(); defer q.mu.Unlock(); return q.waiting == 1 })
		q.hurry()
		<-waiting
		q.wait(early) // queued before the hurry, waiting only after it: at once
		later := waitAsync(t, q, time.Now())
		select {
		case <-later:
			t.Fatal("a tidy queued after the hurry did not wait")
		case <-time.After(50 * time.Millisecond):
		}
		q.stopDeferring()
		<-later
		q.wait(time.Now()) // no more waits
	})
}

// testClock is a gateClock that moves only by advance; its timers fire then.
type testClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*testTimer
}

type testTimer struct {
	clk    *testClock
	c      chan time.Time
	when   time.Time
	active bool
}

func newTestClock() *testClock { return &testClock{now: time.Unix(1e9, 0)} }

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) NewTimer(d time.Duration) gateTimer {
	t := &testTimer{clk: c, c: make(chan time.Time, 1)}
	c.mu.Lock()
	c.timers = append(c.timers, t)
	c.mu.Unlock()
	t.Reset(d)
	return t
}

func (t *testTimer) C() <-chan time.Time { return t.c }

func (t *testTimer) Reset(d time.Duration) bool {
	t.clk.mu.Lock()
	defer t.clk.mu.Unlock()
	was := t.active
	t.when, t.active = t.clk.now.Add(d), true
	t.clk.fireLocked()
	return was
}

func (t *testTimer) Stop() bool {
	t.clk.mu.Lock()
	defer t.clk.mu.Unlock()
	was := t.active
	t.active = false
	return was
}

// advance moves the clock by d and fires the timers due.
func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.fireLocked()
}

func (c *testClock) fireLocked() {
	for _, t := range c.timers {
		if t.active && !t.when.After(c.now) {
			t.active = false
			select {
			case t.c <- c.now:
			default:
			}
		}
	}
}

// settle waits until the gate's wait has done what the clock's time asks of it:
// ended (true), or waits on a timer not yet due (false). A timer that fired is
// inactive until the wait has looked at the time again and set it anew, or returned.
func (c *testClock) settle(t *testing.T, done <-chan struct{}) (ended bool) {
	t.Helper()
	for deadline := time.Now().Add(waitLong); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		select {
		case <-done:
			return true
		default:
		}
		c.mu.Lock()
		armed := false
		for _, t := range c.timers {
			armed = armed || t.active
		}
		c.mu.Unlock()
		if armed {
			return false
		}
	}
	t.Fatal("the gate's wait neither ended nor waited on a timer within waitLong")
	return false
}

// quietNexlet runs a native nexlet whose stop tidies wait by q.
func quietNexlet(fn *fakeNode, q *quietGate) *testNexlet {
	return fn.startNexletHooked(Config{}, func(n *Nexlet) { n.quiet = q })
}

// stopReplied sends a stop for id and waits for its reply only (not its tidy).
func stopReplied(t *testing.T, fn *fakeNode, id string) {
	t.Helper()
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, id), protocol.StopWorkloadRequest{Namespace: testNS}, waitLong)
	if err != nil {
		t.Fatal(err)
	}
	var resp protocol.StopWorkloadResponse
	if err := json.Unmarshal(r.data, &resp); err != nil || !resp.Stopped {
		t.Fatalf("stop %s: %v %q", id, err, r.data)
	}
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestTidyWaitsWhileRequestsCome: a stopped workload's leftovers stay while starts
// keep coming to the nexlet, and go by the cap though they still come. Before, the
// tidy ran right after the stop's reply.
func TestTidyWaitsWhileRequestsCome(t *testing.T) {
	fn := newFakeNode(t)
	tn := quietNexlet(fn, newQuietGate(time.Hour, 1500*time.Millisecond, 64))
	fn.mustStart("held", startReq(protocol.LifecycleService, "held", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds()))
	fn.waitLog("held", "stdout", "up")
	dir, rec := filepath.Join(tn.WorkloadsDir(), "held"), tn.recordDir("held")
	stopReplied(t, fn, "held")
	stopped := time.Now()
	job := startReq(protocol.LifecycleJob, "tick", map[string]any{"uri": script(t, `exit 0`)}, fn.creds())
	var gone time.Duration
	for i := 0; time.Since(stopped) < 3*time.Second; i++ {
		fn.mustStart("tick-"+strconv.Itoa(i), job)
		if el := time.Since(stopped); el < 700*time.Millisecond && (!exists(dir) || !exists(rec)) {
			t.Fatalf("tidied %v after the stop while starts kept coming, before its cap", el)
		}
		if gone == 0 && !exists(dir) && !exists(rec) && fn.hasStoppedEvent("held") {
			gone = time.Since(stopped)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Under load the loop may end before the tidy it saw coming; with an hour's
	// window only the cap can run it now, so a bounded wait still proves the cap.
	for wait := time.Now().Add(waitLong); gone == 0 && time.Now().Before(wait); time.Sleep(20 * time.Millisecond) {
		if !exists(dir) && !exists(rec) && fn.hasStoppedEvent("held") {
			gone = time.Since(stopped)
		}
	}
	if gone == 0 {
		t.Fatal("not tidied by its cap")
	}
	if gone < 1500*time.Millisecond {
		t.Errorf("tidied %v after the stop, before its cap", gone)
	}
	t.Logf("tidied %v after the stop", gone)
}

// TestTidyRunsWhenQuiet: with no request after the stop, its leftovers go once the
// window passed, long before the cap.
func TestTidyRunsWhenQuiet(t *testing.T) {
	fn := newFakeNode(t)
	tn := quietNexlet(fn, newQuietGate(2*time.Second, time.Hour, 64))
	fn.mustStart("q", startReq(protocol.LifecycleService, "q", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds()))
	fn.waitLog("q", "stdout", "up")
	dir := filepath.Join(tn.WorkloadsDir(), "q")
	asked := time.Now()
	stopReplied(t, fn, "q")
	time.Sleep(100 * time.Millisecond)
	// The window began at the stop's arrival, after asked: a tidy seen less than 2 s
	// after asked ran inside it (later, a loaded machine's delay says nothing).
	if (!exists(dir) || fn.hasStoppedEvent("q")) && time.Since(asked) < 2*time.Second {
		t.Fatal("tidied within the quiet window")
	}
	fn.stoppedEvent("q") // waits up to waitLong
	if exists(dir) || exists(tn.recordDir("q")) {
		t.Error("WORKLOADSTOPPED before the leftovers went")
	}
}

// TestShutdownRunsHeldTidies: a tidy waiting for a quiet moment runs at the nexlet's
// shutdown, which then returns (its drain waits for the tidies) with nothing left.
func TestShutdownRunsHeldTidies(t *testing.T) {
	spec := cgroupSpec(t)
	fn := newFakeNode(t)
	tn := fn.startNexletHooked(Config{Cgroup: spec}, func(n *Nexlet) { n.quiet = newQuietGate(time.Hour, time.Hour, 64) })
	fn.mustStart("sd", startReq(protocol.LifecycleService, "sd", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds()))
	fn.waitLog("sd", "stdout", "up")
	pids := fn.procsOf("sd")
	if len(pids) != 1 {
		t.Fatalf("processes: %v", pids)
	}
	group := filepath.Join("/sys/fs/cgroup/memory", memoryCgroup(t, pids[0]))
	tn.mu.Lock()
	id := tn.workloads["sd"].ident
	tn.mu.Unlock()
	dir, rec := filepath.Join(tn.WorkloadsDir(), "sd"), tn.recordDir("sd")
	stopReplied(t, fn, "sd")
	time.Sleep(50 * time.Millisecond)
	if !exists(dir) {
		t.Fatal("tidied before the shutdown: the test's window did not hold it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tn.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with a held tidy: %v", err)
	}
	for _, p := range []string{dir, rec, group} {
		if exists(p) {
			t.Errorf("%s left after the shutdown", p)
		}
	}
	fn.stoppedEvent("sd") // sent before the tidy counted as done; on its way over NATS
	if id.dynamic {       // its release follows in its batch
		testkit.Eventually(t, "the uid's lease released", func() bool { return !exists(tn.users.leasePath(id.uid)) })
	}
}

// TestShortOfUIDsRunsHeldTidies: a deploy that finds no uid leased ahead ends the
// held tidies' waits, so a stopped workload's uid goes back to the range (its tidy, then
// its release) instead of staying held for a quiet moment that a stream of deploys
// never leaves. With one uid in the range the next deploys get it back within the
// release's batch; before, never while the tidy waited.
func TestShortOfUIDsRunsHeldTidies(t *testing.T) {
	needRoot(t)
	uid := testkit.UIDs(t, 1)
	fn := newFakeNode(t)
	tn := fn.startNexletHooked(Config{Users: UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: t.TempDir(), Pool: 1}},
		func(n *Nexlet) { n.quiet = newQuietGate(time.Hour, time.Hour, 64) })
	run := map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}
	testkit.Eventually(t, "the pool's filler leased the one uid", func() bool { return exists(tn.users.leasePath(uid)) })
	fn.mustStart("one", startReq(protocol.LifecycleService, "one", run, fn.creds()))
	fn.waitLog("one", "stdout", "up")
	dir := filepath.Join(tn.WorkloadsDir(), "one")
	stopReplied(t, fn, "one")
	if !exists(dir) {
		t.Fatal("tidied at once: the test's window did not hold it")
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		id := "two-" + strconv.Itoa(i)
		r := fn.start(id, startReq(protocol.LifecycleService, id, run, fn.creds()))
		if r.code == "" {
			fn.waitLog(id, "stdout", "up")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no deploy got the stopped workload's uid back: %s %s (its directory still there: %v)", r.code, r.errText, exists(dir))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if exists(dir) {
		t.Error("the stopped workload's directory is still there")
	}
}

// TestReplayDuringStopTidyStartsNothing: a replayed start (the node's registration
// answer, made before the stop's end reached it) of a service whose stop is finished
// and whose tidy is under way starts nothing: the tidy's WORKLOADSTOPPED tells the node.
// Before, the replay waited for the tidy and then started the stopped service again
// (e2e TestNoWaitStopSurvivesKillRightAfterAnswer/nexd: nexd killed right after a
// no-wait stop's answer, the next nexd adopted the nexlet while the stop ended, and the
// service ran on with a new uid).
func TestReplayDuringStopTidyStartsNothing(t *testing.T) {
	fn := newFakeNode(t)
	tn := quietNexlet(fn, newQuietGate(time.Hour, time.Second, 64)) // the tidy waits its cap
	req := startReq(protocol.LifecycleService, "svc", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds())
	fn.mustStart("svc", req)
	fn.waitLog("svc", "stdout", "up")
	stopReplied(t, fn, "svc")
	tn.mu.Lock()
	_, tidying := tn.tidying["svc"]
	tn.mu.Unlock()
	if !tidying {
		t.Fatal("the stop's tidy is not under way")
	}
	if _, err := tn.StartWorkload("svc", &req, true); err != nil {
		t.Fatalf("replayed start during the tidy: %v", err)
	}
	fn.stoppedEvent("svc") // waits up to waitLong
	if n := fn.countEvents(protocol.EventWorkloadStarted, "svc"); n != 1 {
		t.Errorf("%d WORKLOADSTARTED events, want 1 (the replay started the stopped service again)", n)
	}
	if p := fn.procsOf("svc"); len(p) != 0 {
		t.Errorf("the stopped service runs again after the replay: %v", p)
	}
}
