package node

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// countingStore counts the removals the node asks of its store, by workload id, as
// they begin; each waits delay first (a slow store: the KV round trip, held open).
type countingStore struct {
	Store
	delay time.Duration
	mu    sync.Mutex
	dels  map[string]int
}

func (s *countingStore) Delete(ctx context.Context, typ, id string) error {
	s.mu.Lock()
	s.dels[id]++
	s.mu.Unlock()
	time.Sleep(s.delay)
	return s.Store.Delete(ctx, typ, id)
}

func (s *countingStore) deletes(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dels[id]
}

// TestOwnWorkloadStoppedRemovesOnce: a nexlet without the direct feed grant reports a
// workload's end (WORKLOADENDED); the node removes it from node state and publishes
// its WORKLOADSTOPPED from the report, which the node hears on the feed as every
// subscriber does. The nexlet's registration does not say nexd_reports_ended (the
// node's fakes, or any nexlet that sends reports without saying so; nexd's SDK says
// it, and such events were ignored already), so the event counted as an end too: while
// the first removal ran, it removed the workload a second time (a real nats-server, a
// store whose removals take 300 ms), or, with the store's JetStream disabled, wrote its
// tombstone a second time. Before: 2 removals each; now 1. A WORKLOADSTOPPED published
// afterwards for another workload (as upstream's SDK does) still removes that one; it
// also shows the node's own event was handled before it.
func TestOwnWorkloadStoppedRemovesOnce(t *testing.T) {
	for _, down := range []bool{false, true} {
		name := "store up"
		if down {
			name = "store down"
		}
		t.Run(name, func(t *testing.T) {
			srv := testnats.Start(t, testnats.Options{})
			cs := &countingStore{Store: kvTombstones(t, srv, "OWNSTOP"), dels: map[string]int{}}
			if !down {
				cs.delay = 300 * time.Millisecond
			}
			f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = cs })
			n := f.nodes[0]
			a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", nil)
			ended, other := f.deployIn(t, "default", "ended"), f.deployIn(t, "default", "other")
			if down {
				if err := srv.DisableJetStream(); err != nil {
					t.Fatal(err)
				}
			}
			m := request(t, a.nc, protocol.WorkloadEndedSubject(n.ID(), a.id, ended), protocol.WorkloadStoppedEvent{ID: ended, Namespace: "default", WorkloadType: "native"})
			if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
				t.Fatalf("ended report: %s %s", code, m.Header.Get(protocol.HeaderError))
			}
			// After the node's own event (published before the acknowledgement, on the
			// same subscription of the node), an upstream-style event for the other.
			if err := f.client.Publish(protocol.EventSubject("default", protocol.EventWorkloadStopped),
				mustJSON(t, protocol.WorkloadStoppedEvent{ID: other, Namespace: "default", WorkloadType: "native"})); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for cs.deletes(other) == 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if cs.deletes(other) != 1 {
				t.Fatalf("the upstream-style WORKLOADSTOPPED of %s: %d removals, want 1", other, cs.deletes(other))
			}
			if got := cs.deletes(ended); got != 1 {
				t.Errorf("the reported end of %s: %d removals from node state, want 1", ended, got)
			}
		})
	}
}
