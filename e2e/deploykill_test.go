package e2e

import (
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestDeployKilledBeforeSendRunsOnce: nexd is killed (-9) while a job's deploy is held
// (NEXD_TEST_HOLD=deploy-recorded) between its record in node state (a real JetStream
// bucket on a real nats-server) and the start's send to the native nexlet: the record is
// there, no nexlet ever got the start, the client got no answer. The next nexd on the same
// state must run the job exactly once: with the nexlet outliving nexd (an OOM kill of
// nexd alone), and with both killed. Before, the nexlet (nexd's SDK) did not hold the
// job, and reconcile took a stored job its nexlet does not hold for one that ran: it
// was removed and never run (0 runs).
func TestDeployKilledBeforeSendRunsOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	deployKilledInWindows(t, testhold.DeployRecorded)
}

// TestDeployKilledAfterAnswerRunsOnce: the other side of the window: nexd is killed (-9)
// once the native nexlet answered a job's start (held there by
// NEXD_TEST_HOLD=deploy-answered), before the node kept the workload, replied and
// marked the record started; the job ran and ended meanwhile. The next nexd on the same
// state must not run it again: the nexlet holds the job it ran (its memory of starts),
// and the record gets its start mark then. Exactly one run, with the nexlet outliving
// nexd and with both killed.
func TestDeployKilledAfterAnswerRunsOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	deployKilledInWindows(t, testhold.DeployAnswered)
}

// deployKilledInWindows runs deployKilledInWindow at hold with nexd alone killed and
// with its nexlet too.
func deployKilledInWindows(t *testing.T, hold string) {
	for _, both := range []bool{false, true} {
		name := "nexd"
		if both {
			name = "nexd+nexlet"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			deployKilledInWindow(t, hold, both)
		})
	}
}

// deployKilledInWindow deploys a job that appends a line to a file and exits, kills
// nexd (and, with both, its native nexlet) once the deploy is held at hold, starts the
// next nexd on the same state and counts the job's runs: exactly one.
func deployKilledInWindow(t *testing.T, hold string, both bool) {
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	opts := nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv"}}
	held := opts
	held.env = []string{testhold.Env + "=" + hold}
	n := startNode(t, held)
	st := n.waitReady(t)
	n.waitNative(t)
	c := newCrashLoop(t, "deploykill")
	args := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
	args = append(args, "workload", "run", "--name", "deploykill", "--lifecycle", "job",
		"--start-request", `{"restart": {"policy": "never"}}`, "--",
		"/bin/sh", "-c", `echo run >> "$1"`, c.marker, c.runsFile)
	bin, home := nexctlBin(t), t.TempDir()
	type answer struct {
		out, errOut string
		code        int
	}
	answered := make(chan answer, 1)
	go func() {
		var a answer
		a.out, a.errOut, a.code, _ = runIn(home, nil, bin, args...)
		answered <- a
	}()
	testkit.EventuallyWithin(t, 60*time.Second, "the deploy held at "+hold, func() bool {
		return strings.Contains(n.out.String(), "hold="+hold)
	})
	nc := testnats.Connect(t, s)
	id := heldWorkloadID(t, n.out.String(), hold)
	if !kvHas(t, nc, st.NodeID, "native", id) {
		t.Fatalf("the held deploy's workload %s is not in node state", id)
	}
	if hold == testhold.DeployAnswered {
		testkit.EventuallyWithin(t, 30*time.Second, "the job ran", func() bool { return c.runs() == 1 })
	} else if got := c.runs(); got != 0 {
		t.Fatalf("the job ran %d times before its start was sent", got)
	}
	if both {
		killNexdAndNexlet(t, n)
	} else {
		n.signal(t, syscall.SIGKILL)
		n.wait(t, 30*time.Second)
	}
	select {
	case a := <-answered:
		t.Logf("the deploy's client after the kill: exit %d: %s%s", a.code, a.out, a.errOut)
	case <-time.After(90 * time.Second):
		t.Fatal("the deploy's client never returned")
	}

	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	n2.waitNative(t)
	testkit.EventuallyWithin(t, 30*time.Second, "the job ran", func() bool { return c.runs() >= 1 })
	time.Sleep(3 * time.Second) // a second run would have started by now
	if got := c.runs(); got != 1 {
		t.Fatalf("the job ran %d times, want exactly once\nnexd:\n%s", got, n2.out.String())
	}
	t.Logf("job %s: 1 run", id)
	if hold == testhold.DeployAnswered {
		// Held by its nexlet, its record is marked started now: once the nexlet forgets
		// the finished job, the record still says it ran.
		testkit.EventuallyWithin(t, 30*time.Second, "the record marked started or removed", func() bool {
			return kvStarted(t, nc, st.NodeID, "native", id)
		})
	}
}

// heldWorkloadID is the workload id in nexd's log line of the hold.
func heldWorkloadID(t *testing.T, out, hold string) string {
	t.Helper()
	for line := range strings.SplitSeq(out, "\n") {
		if !strings.Contains(line, "hold="+hold) {
			continue
		}
		for f := range strings.FieldsSeq(line) {
			if v, ok := strings.CutPrefix(f, "workload_id="); ok {
				return v
			}
		}
	}
	t.Fatalf("no workload id in the hold's log line:\n%s", out)
	return ""
}

// kvStarted says whether the workload's record in node state is marked started
// (nexd_started), or gone.
func kvStarted(t *testing.T, nc *nats.Conn, nodeID, typ, id string) bool {
	t.Helper()
	v, ok := kvValue(t, nc, nodeID, typ, id)
	return !ok || strings.Contains(string(v), `"nexd_started":true`)
}

// kvValue is the workload's record in node state, if any.
func kvValue(t *testing.T, nc *nats.Conn, nodeID, typ, id string) ([]byte, bool) {
	t.Helper()
	kv := testnats.StateBucket(t, nc, nodeID)
	e, err := kv.Get(t.Context(), typ+"."+id)
	if err != nil {
		return nil, false
	}
	return e.Value(), true
}

// TestDeployRecordAnswerLostOnTheWire: a deploy's record reaches the real nats-server's
// JetStream bucket, and the connection nexd wrote it on is cut right after (a proxy
// between nexd and the server forwards the write, then closes both ends): the write's
// answer is lost on the wire, nexd connects again. The deploy must be answered "not
// started" only with its record gone: 0 records left, and after a kill -9 of nexd the
// next nexd on the same state replays nothing: 0 runs. Before 0f7f872 a write whose
// answer was lost counted as nothing written: answered not started with the record
// left, and the next nexd started the service (daemon/node
// TestDeployRecordAnswerLostLeavesNoRecord plays the same at the store's seam).
func TestDeployRecordAnswerLostOnTheWire(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	var armed, cut atomic.Bool
	p := startDropProxy(t, s.ClientURL(), proxyRules{cut: func(subj string) bool {
		// The record's write: $KV.nex-<node>.native.<id> (not the node's probe writes).
		return strings.HasPrefix(subj, "$KV.nex-") && strings.Contains(subj, ".native.") && armed.Load() && cut.CompareAndSwap(false, true)
	}})
	dir := t.TempDir()
	opts := nodeOpts{external: p.URL(), stateDir: dir, extra: []string{"--state", "kv"}}
	n := startNode(t, opts)
	st := n.waitReady(t)
	n.waitNative(t)
	nc := testnats.Connect(t, s)
	js, _ := jetstream.New(nc)
	stream, err := js.Stream(t.Context(), "KV_nex-"+st.NodeID)
	if err != nil {
		t.Fatal(err)
	}
	before, err := stream.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	c := newCrashLoop(t, "recordlost")
	armed.Store(true)
	out, errOut, code := n.ctl(t, "workload", "run", "--name", "recordlost", "--",
		"/bin/sh", "-c", `echo run >> "$1"; while :; do sleep 1; done`, c.marker, c.runsFile)
	t.Logf("the deploy: exit %d: %s%s", code, out, errOut)
	if !cut.Load() {
		t.Fatal("the record's write was never cut")
	}
	if code == 0 || !strings.Contains(out+errOut, "not started") {
		t.Fatalf("the deploy whose record's answer was lost: exit %d, want not started: %s%s", code, out, errOut)
	}
	after, err := stream.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the bucket's stream took %d writes during the deploy (the record and its removal)", after.State.LastSeq-before.State.LastSeq)
	if after.State.LastSeq-before.State.LastSeq < 2 {
		t.Errorf("the bucket took %d writes: want the record, then its removal", after.State.LastSeq-before.State.LastSeq)
	}
	kv := testnats.StateBucket(t, nc, st.NodeID)
	keys, _ := kv.ListKeys(t.Context())
	records := 0
	for k := range keys.Keys() {
		if strings.HasPrefix(k, "native.") {
			records++
		}
	}
	if records != 0 {
		t.Errorf("%d records left in node state after a deploy answered not started", records)
	}
	n.signal(t, syscall.SIGKILL)
	n.wait(t, 30*time.Second)
	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	n2.waitNative(t)
	time.Sleep(3 * time.Second) // a replay would have started it by now
	t.Logf("records left %d, runs %d", records, c.runs())
	if got := c.runs(); got != 0 {
		t.Fatalf("the deploy answered not started ran %d times", got)
	}
}

// TestForgottenJobNotRunAgain: nexd is killed (-9) once the native nexlet answered a
// job's start (NEXD_TEST_HOLD=deploy-answered: before the node kept it and marked its
// record started); the job ran and ended meanwhile, its end acknowledged by that nexd
// while the deploy was still under way (so the deploy, not the report, was to remove
// its record). The nexlet outlives nexd and forgets the finished job (finished-short:
// a second, not its hour) before the next nexd comes. The next nexd finds the record
// unmarked, under the nexlet's memory of starts: the job must not run again. Before,
// the nexlet's prune removed the job's record with it from the table, the job was held
// nowhere, and the next nexd took it for a start that never reached the nexlet: 2 runs.
func TestForgottenJobNotRunAgain(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	opts := nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv"}}
	held := opts
	held.env = []string{testhold.Env + "=" + testhold.DeployAnswered + "," + testhold.FinishedShort}
	n := startNode(t, held)
	st := n.waitReady(t)
	n.waitNative(t)
	nc := testnats.Connect(t, s)
	beats, err := nc.SubscribeSync(protocol.AgentHeartbeatSubject(st.NodeID, "*"))
	if err != nil {
		t.Fatal(err)
	}
	c := newCrashLoop(t, "forgotten")
	args := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
	args = append(args, "workload", "run", "--name", "forgotten", "--lifecycle", "job",
		"--start-request", `{"restart": {"policy": "never"}}`, "--",
		"/bin/sh", "-c", `echo run >> "$1"`, c.marker, c.runsFile)
	bin, home := nexctlBin(t), t.TempDir()
	answered := make(chan int, 1)
	go func() {
		_, _, code, _ := runIn(home, nil, bin, args...)
		answered <- code
	}()
	testkit.EventuallyWithin(t, 60*time.Second, "the deploy held after the nexlet's answer", func() bool {
		return strings.Contains(n.out.String(), "hold="+testhold.DeployAnswered)
	})
	id := heldWorkloadID(t, n.out.String(), testhold.DeployAnswered)
	testkit.EventuallyWithin(t, 30*time.Second, "the job ran", func() bool { return c.runs() == 1 })
	testkit.EventuallyWithin(t, 30*time.Second, "the nexlet saw the job end", func() bool {
		return strings.Contains(n.out.String(), "workload stopped") && strings.Contains(n.out.String(), id)
	})
	n.signal(t, syscall.SIGKILL) // its native nexlet outlives it
	n.wait(t, 30*time.Second)
	select {
	case code := <-answered:
		t.Logf("the deploy's client after the kill: exit %d", code)
	case <-time.After(90 * time.Second):
		t.Fatal("the deploy's client never returned")
	}
	if v, ok := kvValue(t, nc, st.NodeID, "native", id); !ok || strings.Contains(string(v), `"nexd_started":true`) {
		t.Fatalf("the job's record after the kill: present %v, %s; want it there unmarked", ok, v)
	}
	// The nexlet prunes at each heartbeat: the second one from a moment past the
	// retention was taken after it.
	past := time.Now().Add(testhold.FinishedShortBy)
	for seen := 0; seen < 2; {
		if _, err := beats.NextMsg(60 * time.Second); err != nil {
			t.Fatalf("the nexlet's heartbeats: %v", err)
		}
		if time.Now().After(past) {
			seen++
		}
	}

	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	n2.waitNative(t)
	testkit.EventuallyWithin(t, 60*time.Second, "the job's record out of node state", func() bool {
		_, stored := kvValue(t, nc, st.NodeID, "native", id)
		return !stored
	})
	testkit.EventuallyWithin(t, 30*time.Second, "no process of the job", func() bool { return len(markerPIDs(c.marker)) == 0 })
	if got := c.runs(); got != 1 {
		t.Fatalf("job %s ran %d times, want once\nnexd:\n%s", id, got, n2.out.String())
	}
	t.Logf("job %s: 1 run", id)
}
