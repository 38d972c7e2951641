package node

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// TestStopWhileOwnerRestarts: a workload is stopped while the nexlet that runs it is
// between two lives (its process ended, the supervisor told the node, its successor
// not registered yet: a native nexlet's crash and restart). The node owns the workload
// and keeps it in its state, so the successor's registration gets it back (a replay)
// and runs it on. The stop must wait for the successor (within the stop's bound) and
// stop the workload there. Before, the stop asked the nexlets registered then, none had
// it, the answer was "workload not found", and the successor ran the workload on, still
// in node state: a stop not honoured. When the nexlet does not come back within the
// bound, the answer says so (not "not found"), and the workload is kept.
func TestStopWhileOwnerRestarts(t *testing.T) {
	t.Parallel()
	t.Run("comes back", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, 1, nil)
		n := f.nodes[0]
		a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", func(a *fakeAgent) { a.req.Workloads = &[]string{} })
		id := f.deployIn(t, "tenant", "svc")
		a.kill()
		n.RemoveAgent("AGENTNATIVE", "process ended")
		answered := make(chan *nats.Msg, 1)
		go func() {
			m, _ := f.client.Request(protocol.UndeploySubject("tenant", id), mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant"}), 20*time.Second)
			answered <- m
		}()
		time.Sleep(300 * time.Millisecond) // the stop waits meanwhile (a nexlet's restart backoff)
		succ := newFakeAgent(t, f.srv, n.ID(), "AGENTNATIVE", "native", "native")
		succ.req.Workloads = &[]string{id}
		succ.mustRegister()
		succ.startHeartbeats()
		m := <-answered
		var r protocol.StopWorkloadResponse
		if m == nil || protocol.Decode(m.Data, &r) != nil {
			t.Fatalf("stop answer: %v", m)
		}
		stored, err := f.stores[0].ByType(context.Background(), "native")
		if err != nil {
			t.Fatal(err)
		}
		running := succ.workloadCount()
		t.Logf("stop while the owner restarts: stopped=%v %q; the successor runs %d, node state holds %d", r.Stopped, r.Message, running, len(stored))
		if !r.Stopped || running != 0 || len(stored) != 0 {
			t.Fatalf("stop while its nexlet restarts: answered stopped=%v %q, the successor runs %d workload(s), %d in node state; want stopped, 0, 0",
				r.Stopped, r.Message, running, len(stored))
		}
	})
	t.Run("stays away", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, 1, func(_ int, o *Options) { o.StopTimeout = time.Second })
		n := f.nodes[0]
		a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", nil)
		id := f.deployIn(t, "tenant", "svc")
		a.kill()
		n.RemoveAgent("AGENTNATIVE", "process ended")
		m := request(t, f.client, protocol.UndeploySubject("tenant", id), protocol.StopWorkloadRequest{Namespace: "tenant"})
		var r protocol.StopWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil {
			t.Fatal(err)
		}
		if r.Stopped || !strings.Contains(r.Message, "local:native") || !strings.Contains(r.Message, "not registered") {
			t.Fatalf("stop while its nexlet stays away: stopped=%v %q; want not stopped, naming the nexlet that is not registered", r.Stopped, r.Message)
		}
		if stored, _ := f.stores[0].ByType(context.Background(), "native"); len(stored) != 1 {
			t.Fatalf("%d workloads in node state, want the one not stopped kept", len(stored))
		}
	})
}

// TestStopsWaitingForAnAbsentOwnerDoNotHoldTheNode: a tenant floods stops of its own
// workload while the nexlet that runs it is not registered (a remote nexlet gone, a
// native one in its restart backoff). Each stop waits for that nexlet (awaitOwner), up
// to a minute, on one of the node's 64 request goroutines; once they were all taken,
// stops ran on the UNDEPLOY subscription's own goroutine, one after another, each
// waiting its bound, and every other tenant's stop waited behind them (5 s here, the
// bound): one tenant held every stop on the node for as long as it kept sending. Now one stop of a workload
// waits for its nexlet at a time, on a goroutine of the node's, never on the
// subscription's: a tenant's other stops of it meanwhile are answered at once, not
// stopped, saying an earlier stop waits (or that no goroutine was free to wait).
func TestStopsWaitingForAnAbsentOwnerDoNotHoldTheNode(t *testing.T) {
	t.Parallel()
	const bound = 5 * time.Second
	f := newFixture(t, 1, func(_ int, o *Options) { o.StopTimeout = bound })
	n := f.nodes[0]
	a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", nil)
	gone := f.deployIn(t, "tenant-a", "svc")
	a.kill()
	n.RemoveAgent("AGENTNATIVE", "process ended")
	b := f.healthyAgent(n, "AGENTOTHER", "other", "native", nil)
	b.startHeartbeats()
	other := f.deployIn(t, "tenant-b", "svc")

	const flood = 80 // more than the node's 64 request goroutines
	replies := make(chan *nats.Msg, flood)
	inbox := nats.NewInbox()
	sub, err := f.client.ChanSubscribe(inbox, replies)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	body := mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant-a"})
	for range flood {
		if err := f.client.PublishRequest(protocol.UndeploySubject("tenant-a", gone), inbox, body); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.client.Flush(); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	m, err := f.client.Request(protocol.UndeploySubject("tenant-b", other), mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant-b"}), 2*bound)
	took := time.Since(began)
	var r protocol.StopWorkloadResponse
	if err == nil {
		err = protocol.Decode(m.Data, &r)
	}
	t.Logf("tenant-b's stop behind %d stops of tenant-a's workload whose nexlet is away: %v after %s (stopped=%v %q)", flood, err, took.Round(time.Millisecond), r.Stopped, r.Message)
	// Held behind them, it waited for one of them to give up on the nexlet: the bound
	// (a minute on a real node), and as long again for each further wave a tenant sends.
	if err != nil || !r.Stopped || took >= bound/2 {
		t.Fatalf("tenant-b's stop of its own workload on a registered nexlet, sent after %d stops of tenant-a's workload whose nexlet is away: %v, stopped=%v %q after %s; want stopped, not held behind them (their bound %s)",
			flood, err, r.Stopped, r.Message, took.Round(time.Millisecond), bound)
	}
	if b.workloadCount() != 0 {
		t.Fatalf("tenant-b's workload still runs on its nexlet")
	}

	// Every stop of tenant-a's workload is answered, none stopped it (its nexlet never
	// came back); one waited for the nexlet, the others were answered at once: an
	// earlier stop waits, or (run on the subscription's goroutine) none may wait there.
	deadline := time.After(bound + 10*time.Second)
	waited := 0
	for i := range flood {
		select {
		case m := <-replies:
			var r protocol.StopWorkloadResponse
			if err := protocol.Decode(m.Data, &r); err != nil {
				t.Fatalf("answer %d: %v (%q)", i, err, m.Data)
			}
			if r.Stopped {
				t.Fatalf("answer %d: stopped, with its nexlet away", i)
			}
			switch {
			case strings.Contains(r.Message, "did not come back"):
				waited++
			case strings.Contains(r.Message, "an earlier stop"), strings.Contains(r.Message, "no request goroutine free"):
			default:
				t.Fatalf("answer %d: %q", i, r.Message)
			}
		case <-deadline:
			t.Fatalf("%d of %d stops of the workload whose nexlet is away answered", i, flood)
		}
	}
	if waited != 1 {
		t.Fatalf("%d of %d stops waited for the nexlet that is away, want 1", waited, flood)
	}
	if stored, _ := f.stores[0].ByType(context.Background(), "native"); len(stored) != 1 {
		t.Fatalf("%d workloads in node state, want tenant-a's, not stopped, kept", len(stored))
	}
}
