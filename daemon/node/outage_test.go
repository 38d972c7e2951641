package node

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestOutageKeepsRegistrations: while the node's own NATS connection is down it hears
// no heartbeat, so that silence removes no nexlet (and so loses none of its workloads);
// a nexlet silent while the node is connected is still removed (TestHealthTransitions).
// Before, an outage longer than OfflineAfter+RemoveOfflineAfter (95 s in nexd) removed
// every nexlet, and nexd no longer listed their workloads after the reconnect.
func TestOutageKeepsRegistrations(t *testing.T) {
	port := testkit.StablePort(t)
	cfg := func(o *server.Options) { o.Port = port }
	srv := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: cfg})
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) {
		o.DegradedAfter = 200 * time.Millisecond
		o.OfflineAfter = 400 * time.Millisecond
		o.RemoveOfflineAfter = 3 * time.Second
	})
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	health := func() string {
		for _, ai := range n.Agents() {
			if ai.ID == "agent0" {
				return ai.Health
			}
		}
		return "removed"
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	time.Sleep(5 * time.Second) // past OfflineAfter+RemoveOfflineAfter
	if h := health(); h == "removed" {
		t.Fatal("the nexlet's registration was removed during the node's own NATS outage")
	}
	testnats.Start(t, testnats.Options{NoJetStream: true, Configure: cfg})
	testkit.Eventually(t, "the nexlet healthy again after the reconnect", func() bool { return health() == "healthy" })
}

// TestOutageKeepsWorkloadCount: with two workloads running, the node's NATS goes away.
// The nexlets cannot be asked, yet their workloads run on: KnownWorkloads (what status,
// STATUS= and metrics count) still gives both, marked as of the last listing, where
// before it gave none. Back on NATS the listing is live again.
func TestOutageKeepsWorkloadCount(t *testing.T) {
	port := testkit.StablePort(t)
	cfg := func(o *server.Options) { o.Port = port }
	srv := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: cfg})
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.FanoutTimeout = 500 * time.Millisecond })
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", func(a *fakeAgent) {
		a.workloads["w1"] = startReq("system", "one", "x")
		a.workloads["w2"] = startReq("system", "two", "x")
	})
	ctx := context.Background()
	ws, asOf, err := n.KnownWorkloads(ctx)
	if err != nil || len(ws) != 2 || !asOf.IsZero() {
		t.Fatalf("connected: %d workloads as of %v (%v), want 2 live", len(ws), asOf, err)
	}
	listed := time.Now()

	srv.Shutdown()
	srv.WaitForShutdown()
	testkit.Eventually(t, "the node sees the outage", func() bool { return !n.o.NC.IsConnected() })
	if live, err := n.Workloads(ctx); err == nil && len(live) != 0 {
		t.Fatalf("asking the nexlets during the outage listed %d workloads; the test assumes it cannot", len(live))
	}
	ws, asOf, err = n.KnownWorkloads(ctx)
	if err != nil || len(ws) != 2 {
		t.Fatalf("during the outage: %d workloads (%v), want the last known 2", len(ws), err)
	}
	if asOf.IsZero() || asOf.After(listed) {
		t.Fatalf("during the outage: as of %v, want the last listing (before %v)", asOf, listed)
	}

	testnats.Start(t, testnats.Options{NoJetStream: true, Configure: cfg})
	testkit.Eventually(t, "a live listing of both after the reconnect", func() bool {
		ws, asOf, err := n.KnownWorkloads(ctx)
		return err == nil && len(ws) == 2 && asOf.IsZero()
	})
}
