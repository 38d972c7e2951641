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

// readHookStore runs onRead once, after a ByType read and before its answer: what
// happens in between happens between a registration's read of node state and its lock.
type readHookStore struct {
	*MemStore
	mu     sync.Mutex
	onRead func()
}

func (s *readHookStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	out, err := s.MemStore.ByType(ctx, typ)
	s.mu.Lock()
	hook := s.onRead
	s.onRead = nil
	s.mu.Unlock()
	if hook != nil {
		hook()
	}
	return out, err
}

// TestReregisterDuringDeployNotReplayed: a live nexlet that names its memory of starts
// registers again (a Reregister after a lost reply) while a job's deploy to it is in
// flight: the job is recorded, the registration reads node state, then the nexlet
// answers the start and the deploy commits, all before the registration takes the
// node's lock; the registration's held list was made before the start reached the
// nexlet. Before, reconcile took the job for one recorded and never sent (unmarked,
// under the current memory, not held, no longer starting) and replayed it: a second
// start of a job (the native nexlet ignores a replay of an id it holds, but not one
// that ended and was forgotten, and another nexlet may not at all). Now a deploy in
// flight or answered since the read began is left to the deploy: not replayed, its
// record kept and marked started.
func TestReregisterDuringDeployNotReplayed(t *testing.T) {
	hs := &readHookStore{MemStore: NewMemStore()}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = hs })
	n := f.nodes[0]
	held := []string{}
	gate := make(chan struct{})
	a := f.healthyAgent(n, "native0", "native", "native", func(a *fakeAgent) {
		a.req.Workloads, a.req.Memory, a.answerGate = &held, "m1", gate
	})

	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	req := startReq("tenant", "j", `{"cmd":"x"}`)
	req.WorkloadLifecycle = protocol.LifecycleJob
	deployed := make(chan *nats.Msg, 1)
	go func() {
		m, err := f.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), js(req), 10*time.Second)
		if err != nil {
			t.Errorf("deploy: %v", err)
		}
		deployed <- m
	}()
	// Recorded (before its send) and sent; its answer held.
	testkit.Eventually(t, "the start at the nexlet", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.starts == 1
	})
	var reply *nats.Msg
	hs.mu.Lock()
	hs.onRead = func() {
		close(gate) // the nexlet answers, and the deploy commits and replies
		reply = <-deployed
	}
	hs.mu.Unlock()

	// The same live nexlet registers again, with its list made before the start came.
	m := a.send(protocol.RegisterSubject(n.ID(), a.id), mustJSON(t, a.req))
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
		t.Fatalf("registration refused: %s %s", code, m.Data)
	}
	var resp protocol.RegisterAgentResponse
	if err := protocol.Decode(m.Data, &resp); err != nil {
		t.Fatal(err)
	}
	var started protocol.StartWorkloadResponse
	if reply == nil || protocol.Decode(reply.Data, &started) != nil || started.ID == "" {
		t.Fatalf("deploy not answered before the registration's lock: %v", reply)
	}
	if _, ok := resp.ExistingState[started.ID]; ok {
		t.Fatalf("job %s, answered by its nexlet while the registration ran, was replayed to it: a second start", started.ID)
	}
	testkit.Eventually(t, "the job's record marked started", func() bool {
		left, _ := hs.MemStore.ByType(t.Context(), "native")
		return left[started.ID].Started
	})
}
