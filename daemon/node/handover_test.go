package node

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// putHookStore is a MemStore that runs onPut (once) as a deploy records its workload:
// a fault injected between the deploy's choice of a nexlet and its start request.
type putHookStore struct {
	*MemStore
	mu    sync.Mutex
	onPut func()
}

func (s *putHookStore) Put(ctx context.Context, typ, id string, req protocol.StartWorkloadRequest) error {
	s.mu.Lock()
	hook := s.onPut
	s.onPut = nil
	s.mu.Unlock()
	if hook != nil {
		hook()
	}
	return s.MemStore.Put(ctx, typ, id, req)
}

// TestStartOverNATSHandedOverWhenNexletEndedBeforeTheSend: the supervisor reports the
// end of a nexd nexlet's process (RemoveAgent) after a deploy chose it and before the
// deploy sent its start over NATS (here while it records the workload), and its
// successor registers. The successor takes the start over and the deploy answers.
// Before, RemoveAgent marked only the starts already in flight to it: this one, sent
// just after, waited out the silence (408, outcome unknown) and the successor was not
// given it.
func TestStartOverNATSHandedOverWhenNexletEndedBeforeTheSend(t *testing.T) {
	hs := &putHookStore{MemStore: NewMemStore()}
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = hs
		o.StartTimeout = 3 * time.Second
	})
	n := f.nodes[0]
	old := f.healthyAgent(n, "native1", "native", "native", func(a *fakeAgent) { a.startDelay = time.Minute })
	defer old.kill()
	hs.mu.Lock()
	hs.onPut = func() { n.RemoveAgent("native1", "killed") }
	hs.mu.Unlock()

	bids := f.auction("ns", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	answered := make(chan *nats.Msg, 1)
	go func() {
		m, err := f.client.Request(protocol.DeploySubject("ns", bids[0].BidderID), js(startReq("ns", "w", `{"cmd":"x"}`)), 30*time.Second)
		if err != nil {
			t.Errorf("deploy: %v", err)
		}
		answered <- m
	}()
	testkit.Eventually(t, "the start sent to the ended nexlet", func() bool {
		old.mu.Lock()
		defer old.mu.Unlock()
		return old.starts == 1
	})
	// A restarted nexlet registers under the agent id of its supervised name again.
	successor := newFakeAgent(t, f.srv, n.ID(), "native1", "native", "native")
	successor.mustRegister()
	defer successor.kill()
	m := <-answered
	if m == nil {
		return
	}
	var started protocol.StartWorkloadResponse
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" || protocol.Decode(m.Data, &started) != nil || started.ID == "" {
		t.Fatalf("deploy answered %s %q; want the start handed to the successor", code, m.Data)
	}
	if successor.workloadCount() != 1 {
		t.Errorf("the successor holds %d workloads, want the handed-over start", successor.workloadCount())
	}
}
