package node

import (
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
