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
