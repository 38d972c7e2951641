package node

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestDrainWaitsForDeploysInFlight: a deploy the node took before its lame duck began
// is still starting on a nexlet that holds a workload only once it answered the start
// (an SDK nexlet pulling an image or an artifact; its own lame duck stops nothing) when
// the drain runs. The drain must stop that workload too and leave nothing in node
// state. Before, it listed and stopped what was owned or listed at that moment, said
// "drained", and the start's answer then kept the workload: it ran on after the drain
// and stayed in node state, so the next nexd on that state started it again (and the
// stop-all of the node's exit, with nexd_keep, left it there too).
func TestDrainWaitsForDeploysInFlight(t *testing.T) {
	t.Parallel()
	for _, job := range []bool{false, true} {
		name := "service"
		if job {
			name = "job"
		}
		t.Run(name, func(t *testing.T) {
			f, n := oneNode(t) // parallel
			a := f.healthyAgent(n, "AGENTSLOW", "slow", "native", func(a *fakeAgent) {
				a.startDelay, a.heldUntilAnswer = 1500*time.Millisecond, true
			})
			bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
			if len(bids) != 1 {
				t.Fatalf("bids = %+v", bids)
			}
			req := startReq("tenant", "w1", `{"cmd":"x"}`)
			if job {
				req.WorkloadLifecycle = protocol.LifecycleJob
			}
			deployed := make(chan *nats.Msg, 1)
			go func() {
				m, _ := f.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), mustJSON(t, req), 10*time.Second)
				deployed <- m
			}()
			testkit.Eventually(t, "the nexlet to have the start", func() bool {
				a.mu.Lock()
				defer a.mu.Unlock()
				return a.starts == 1
			})
			if _, err := n.EnterLameduck(0); err != nil {
				t.Fatal(err)
			}
			res, err := n.DrainWorkloads(t.Context())
			if err != nil {
				t.Fatalf("drain: %v", err)
			}
			m := <-deployed
			if m == nil || m.Header.Get(protocol.HeaderErrorCode) != "" {
				t.Fatalf("deploy taken before the lame duck: %v", m)
			}
			var started protocol.StartWorkloadResponse
			if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
				t.Fatalf("deploy answer %q: %v", m.Data, err)
			}
			running := a.workloadCount()
			stored := f.stores[0].Len()
			if running != 0 || stored != 0 || res.Workloads != 1 {
				t.Fatalf("after the drain: %d workloads running on the nexlet, %d in node state, %d drained; want 0, 0, 1 (workload %s)",
					running, stored, res.Workloads, started.ID)
			}
		})
	}
}
