package node

import (
	"slices"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestReplayedEndedNotWaitedFor: a workload handed to a nexlet to replay that ends
// then (a stop under way when the nexlet registered with this nexd, its
// WORKLOADSTOPPED after) leaves node state and is no longer among those the start-up
// waits for (Replayed); the others still are. Before, it stayed there, and READY
// waited for it until startup_timeout.
func TestReplayedEndedNotWaitedFor(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	st := f.stores[0]
	for _, id := range []string{"stopping", "running"} {
		req := startReq("tenant", id, `{}`)
		req.WorkloadLifecycle, req.Owner = protocol.LifecycleService, "local:native"
		if err := st.Put(t.Context(), "native", id, req); err != nil {
			t.Fatal(err)
		}
	}
	a := f.healthyAgent(n, "native0", "native", "native", nil)
	if got := slices.Sorted(slices.Values(n.Replayed())); !slices.Equal(got, []string{"running", "stopping"}) {
		t.Fatalf("replayed %v, want running and stopping", got)
	}
	a.emitStopped("stopping", "tenant")
	testkit.Eventually(t, "the ended workload out of node state", func() bool {
		left, err := st.ByType(t.Context(), "native")
		_, there := left["stopping"]
		return err == nil && !there
	})
	got := n.Replayed()
	t.Logf("replayed and still held once one ended: %v", got)
	if !slices.Equal(got, []string{"running"}) {
		t.Errorf("replayed %v, want only running: the ended one is waited for", got)
	}
}
