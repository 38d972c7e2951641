package node

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// failMarkStore is a store whose first marks fail as a KV write whose answer timed out.
type failMarkStore struct {
	*MemStore
	fails atomic.Int32 // marks still to fail
	tries atomic.Int32
}

func (s *failMarkStore) MarkStarted(ctx context.Context, typ, id string, req protocol.StartWorkloadRequest) error {
	s.tries.Add(1)
	if s.fails.Add(-1) >= 0 {
		return errors.New("nats: timeout")
	}
	return s.MemStore.MarkStarted(ctx, typ, id, req)
}

// TestFailedStartMarkRetried: a job's start mark that fails (a KV hiccup) is tried
// again. Before, one failure left the record unmarked for as long as the node ran, and
// once the nexlet had forgotten the finished job the next nexd ran it a second time.
func TestFailedStartMarkRetried(t *testing.T) {
	t.Parallel()
	st := &failMarkStore{MemStore: NewMemStore()}
	st.fails.Store(2)
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = st })
	f.healthyAgent(f.nodes[0], "native0", "native", "native", func(a *fakeAgent) { a.req.Memory = "m1" })
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	req := startReq("tenant", "j", `{"cmd":"x"}`)
	req.WorkloadLifecycle = protocol.LifecycleJob
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy reply %q %v", m.Data, err)
	}
	testkit.Eventually(t, "the job's record marked started after two failed marks", func() bool {
		left, _ := st.ByType(t.Context(), "native")
		return left[started.ID].Started
	})
	if n := st.tries.Load(); n != 3 {
		t.Errorf("%d marks tried, want 3 (two failed, one taken)", n)
	}
}
