package node

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestStopBoundsHandlersInFlight: a deploy handler stuck past the node's context (here
// in its state store's Put, which ignores cancellation as a store cut off mid-write
// may) must not hold Stop, which the daemon runs without a deadline: Stop gives up
// after StopWait and names what it left behind. Before, Stop waited for as long as the
// handler ran (here until the test released it). Once the store answers, the deploy is
// answered "outcome unknown, node stopping" (never "not started": its record was
// written), its record is kept for the next start, and no nexlet was asked to start it.
func TestStopBoundsHandlersInFlight(t *testing.T) {
	hs := &putHookStore{MemStore: NewMemStore()}
	release := make(chan struct{})
	entered := make(chan struct{})
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = hs
		o.StopWait = time.Second
	})
	n := f.nodes[0]
	a := f.healthyAgent(n, "native1", "native", "native", nil)
	defer a.kill()
	hs.mu.Lock()
	hs.onPut = func() { close(entered); <-release }
	hs.mu.Unlock()

	bids := f.auction("ns", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	answered := make(chan *nats.Msg, 1)
	go func() {
		m, err := f.client.Request(protocol.DeploySubject("ns", bids[0].BidderID), js(startReq("ns", "w", `{"cmd":"x"}`)), time.Minute)
		if err != nil {
			t.Errorf("deploy: %v", err)
		}
		answered <- m
	}()
	<-entered

	stopped := make(chan error, 1)
	go func() { stopped <- n.Stop(context.Background()) }()
	select {
	case err := <-stopped:
		if err == nil || !strings.Contains(err.Error(), "DEPLOY") {
			t.Errorf("Stop: %v; want it to name the deploy handler it left behind", err)
		}
	case <-time.After(20 * time.Second):
		close(release)
		<-stopped
		t.Fatal("Stop still waiting 20 s after it began for a handler stuck past its context (StopWait 1 s)")
	}
	close(release)

	m := <-answered
	if m == nil {
		return
	}
	if m.Header.Get(protocol.HeaderDeployOutcome) == protocol.DeployNotStarted {
		t.Errorf("deploy answered not started although its record was written: %v", m.Header)
	}
	if code := m.Header.Get(micro.ErrorCodeHeader); code != "503" || !strings.Contains(string(m.Data), "node stopping: outcome of the start") {
		t.Errorf("deploy answered %s %q; want 503 saying the node stops and the outcome is unknown", code, m.Data)
	}
	testkit.Eventually(t, "the handler ended", func() bool { return len(n.runningNow()) == 0 })
	recs, err := hs.MemStore.ByType(context.Background(), "native")
	if err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	starts := a.starts
	a.mu.Unlock()
	t.Logf("records kept %d, starts sent %d", len(recs), starts)
	if len(recs) != 1 {
		t.Errorf("%d records kept, want the deploy's (its intent, for the next start)", len(recs))
	}
	if starts != 0 {
		t.Errorf("%d starts sent to the nexlet by a stopped node", starts)
	}
}
