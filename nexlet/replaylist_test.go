package nexlet

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestListAfterHeartbeatNamesReplaySet: a node's list asked the moment a nexlet's
// heartbeat says it serves (what nexd's list waits for after a registration) names
// every stored workload the registration handed it, on its first registration (Run)
// and when it registers again with a new node process (Reregister). The runner takes
// its replay set late (testhold.ReplayLate, 0.3 s), as a loaded machine may: before,
// it sent the heartbeat before it took the set, and the list came back whole with
// 0 of 5 rows (e2e TestListDuringReplayIsWhole failed so once without the hold).
func TestListAfterHeartbeatNamesReplaySet(t *testing.T) {
	const stored = 5
	state := map[string]protocol.AgentStartWorkloadRequest{}
	for i := range stored {
		state[fmt.Sprintf("W%d", i)] = protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{
			Name: fmt.Sprintf("w%d", i), Namespace: "ns", WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "mem"}}
	}
	for _, again := range []bool{false, true} {
		t.Run(fmt.Sprintf("reregister=%t", again), func(t *testing.T) {
			srv := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, srv)
			// The node: the registration that hands out the stored workloads is the
			// first one, or (again) the second.
			var regs atomic.Int32
			_, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) {
				resp := protocol.RegisterAgentResponse{Success: true, NodeID: node,
					ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}}
				if n := regs.Add(1); (n == 1) != again {
					resp.ExistingState = state
				}
				b, _ := json.Marshal(resp)
				_ = m.Respond(b)
			})
			if err != nil {
				t.Fatal(err)
			}
			beats, err := nc.SubscribeSync(protocol.AgentHeartbeatSubject(node, agent))
			if err != nil {
				t.Fatal(err)
			}
			_ = nc.Flush()
			r, err := NewRunner(context.Background(), node, newMemAgent(), WithHeartbeatInterval(time.Hour),
				WithTestHold(testhold.ReplayLate))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = r.Shutdown() })
			register := func() error { return r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}) }
			if again {
				if err := register(); err != nil {
					t.Fatal(err)
				}
				if _, err := beats.NextMsg(5 * time.Second); err != nil {
					t.Fatalf("first heartbeat: %v", err)
				}
				register = r.Reregister
			}
			done := make(chan error, 1)
			go func() { done <- register() }() // the hold may hold it
			if _, err := beats.NextMsg(5 * time.Second); err != nil {
				t.Fatalf("heartbeat after the registration with %d stored workloads: %v", stored, err)
			}
			m, err := nc.Request(protocol.QueryWorkloadsAgentSubject(node, agent), []byte(`{"namespace":"system","filter":[]}`), 2*time.Second)
			if err != nil {
				t.Fatalf("list right after the heartbeat: %v", err)
			}
			var rows []protocol.WorkloadSummary
			if err := json.Unmarshal(m.Data, &rows); err != nil {
				t.Fatalf("list %q: %v", m.Data, err)
			}
			if len(rows) != stored {
				t.Errorf("list asked on the heartbeat after the registration: %d rows, want the %d stored workloads (%s)", len(rows), stored, m.Data)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		})
	}
}
