package node

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// heldPuts is a real KV store whose Put waits until release is closed, then writes the
// record whatever its context says: a put the server took as the node's stop came.
// answered: the put's answer reaches the node; else it sees its context's error (a put
// whose answer the stop cut off), or lost when set (a put whose answer timed out).
type heldPuts struct {
	*state.KV
	answered bool
	lost     error
	entered  chan struct{}
	release  chan struct{}
	once     sync.Once
}

func (h *heldPuts) Put(ctx context.Context, typ, id string, req protocol.StartWorkloadRequest) error {
	h.once.Do(func() { close(h.entered) })
	<-h.release
	if err := h.KV.Put(context.WithoutCancel(ctx), typ, id, req); err != nil {
		return err
	}
	switch {
	case h.answered:
		return nil
	case h.lost != nil:
		return fmt.Errorf("state: store workload %s: %w", id, h.lost)
	}
	return ctx.Err()
}

// TestStopDuringDeployRecordLeavesNoRecord: the node stops (SIGTERM) while a deploy's
// record (the intent) is being written, before the start is sent to the nexlet, and the
// state store (a real JetStream KV bucket) takes the record. The node never sent the
// start, so the deploy is definitively not started: its client must hear that (the
// only answer after which nexctl tries another node) and the record must not be left
// in node state. Before, the record was kept and the client told "outcome unknown ...
// this node adopts or starts it when it next starts" (the put answered) or "may start
// it when it restarts" (the put's answer cut off, and the removal failed on the node's
// cancelled context); but the next node's nexd SDK nexlet does not hold a job it never
// got, and a stored job its nexlet does not hold is taken for one that ran and removed:
// the job never ran anywhere, and the client had been told to wait for it here.
func TestStopDuringDeployRecordLeavesNoRecord(t *testing.T) {
	t.Parallel()
	for _, answered := range []bool{true, false} {
		name := "put answered"
		if !answered {
			name = "put answer cut off"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			srv := testnats.Start(t, testnats.Options{})
			kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv), "STOPDEPLOY", "", nil)
			if err != nil {
				t.Fatal(err)
			}
			held := &heldPuts{KV: kv, answered: answered, entered: make(chan struct{}), release: make(chan struct{})}
			f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = held })
			n := f.nodes[0]
			a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", func(a *fakeAgent) { a.req.Workloads = &[]string{} })
			bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
			if len(bids) != 1 {
				t.Fatalf("bids = %+v", bids)
			}
			req := startReq("tenant", "job1", `{"cmd":"x"}`)
			req.WorkloadLifecycle = protocol.LifecycleJob
			deployed := make(chan *nats.Msg, 1)
			go func() {
				m, _ := f.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), mustJSON(t, req), 20*time.Second)
				deployed <- m
			}()
			select {
			case <-held.entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the deploy never wrote its record")
			}
			stopped := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), 15*time.Second)
				defer cancel()
				stopped <- n.Stop(ctx)
			}()
			<-n.ctx.Done()
			close(held.release)
			m := <-deployed
			if err := <-stopped; err != nil {
				t.Errorf("node stop: %v", err)
			}
			if m == nil {
				t.Fatal("the deploy got no answer")
			}
			recs, err := kv.ByType(context.Background(), "native")
			if err != nil {
				t.Fatal(err)
			}
			a.mu.Lock()
			starts := a.starts
			a.mu.Unlock()
			outcome := m.Header.Get(protocol.HeaderDeployOutcome)
			t.Logf("the deploy's answer: %s %q (%s), %d record(s) left, %d start(s) sent",
				m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError), outcome, len(recs), starts)
			if starts != 0 {
				t.Fatalf("the start was sent to the nexlet (%d): the hold missed its window", starts)
			}
			if outcome != protocol.DeployNotStarted || len(recs) != 0 {
				t.Fatalf("a deploy whose start was never sent, cut short by the node's stop: answered %q %q with outcome %q and %d record(s) left in node state; want %q and none",
					m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError), outcome, len(recs), protocol.DeployNotStarted)
			}
			// What the next node on this state does with it: nothing is left to do.
			f2 := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = kv })
			a2 := f2.healthyAgent(f2.nodes[0], "AGENTNATIVE2", "native", "native", func(a *fakeAgent) { a.req.Workloads = &[]string{} })
			if got := a2.workloadCount(); got != 0 {
				t.Fatalf("the next node replayed %d workload(s) to its nexlet", got)
			}
			testkit.Eventually(t, "node state empty", func() bool {
				recs, err := kv.ByType(context.Background(), "native")
				return err == nil && len(recs) == 0
			})
		})
	}
}

// TestDeployRecordAnswerLostLeavesNoRecord: a deploy's record (the intent) reaches the
// state store (a real JetStream KV bucket) but its answer does not (a timeout: a slow or
// cut-off JetStream), the node running on. The deploy is refused as not started, the
// only answer after which nexctl runs the workload on another node, so no record may
// stay here. Before, the failed write counted as nothing written: the record stayed,
// and when the nexlet registered again (its restart, nexd's) the node replayed it and
// the nexlet started a second copy of a workload its client runs elsewhere.
func TestDeployRecordAnswerLostLeavesNoRecord(t *testing.T) {
	t.Parallel()
	srv := testnats.Start(t, testnats.Options{})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv), "LOSTPUT", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	held := &heldPuts{KV: kv, lost: context.DeadlineExceeded, entered: make(chan struct{}), release: make(chan struct{})}
	close(held.release)
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = held })
	n := f.nodes[0]
	a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", func(a *fakeAgent) { a.req.Workloads = &[]string{} })
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("bids = %+v", bids)
	}
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "svc1", `{"cmd":"x"}`))
	if m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
		t.Fatalf("deploy whose record's answer was lost: %q %q, outcome %q; want it refused as not started",
			m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError), m.Header.Get(protocol.HeaderDeployOutcome))
	}
	recs, err := kv.ByType(context.Background(), "native")
	if err != nil {
		t.Fatal(err)
	}
	// The nexlet registers again (a restart): what the node replays, it starts.
	a.register()
	replayed := len(a.resp.ExistingState)
	t.Logf("refused as not started: %d record(s) left in node state, %d replayed to the nexlet's next registration", len(recs), replayed)
	if len(recs) != 0 || replayed != 0 {
		t.Fatalf("a deploy refused as not started (its client runs it elsewhere) left %d record(s) in node state and %d replayed to the nexlet: a second copy; want none",
			len(recs), replayed)
	}
}
