package node

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/nexd-project/nexd/protocol"
)

// typeUnreadableStore is a MemStore whose reads by type (a registration's) fail while
// down is set, as a state bucket whose JetStream is off or cut off.
type typeUnreadableStore struct {
	*MemStore
	down *atomic.Bool
}

func (u typeUnreadableStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	if u.down.Load() {
		return nil, errors.New("state: read bucket nex-test: context deadline exceeded")
	}
	return u.MemStore.ByType(ctx, typ)
}

// TestRegistrationRefusedWhileStateUnreadable: a nexlet that registers while the node
// cannot read its state is refused (503, protocol.ErrTextStateUnreadable) and not
// registered; once the state reads again, its next registration replays the stored
// workload. Before, it was registered with nothing replayed, and the stored service
// was never replayed to it (e2e TestNexletRestartWhileStateUnreadable).
func TestRegistrationRefusedWhileStateUnreadable(t *testing.T) {
	down := new(atomic.Bool)
	mem := NewMemStore()
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = typeUnreadableStore{MemStore: mem, down: down} })
	n := f.nodes[0]
	if err := mem.Put(t.Context(), "native", "WSTORED", startReq("tenant", "stored", `{}`)); err != nil {
		t.Fatal(err)
	}
	n.ExpectAgent("agentU", "native")
	a := newFakeAgent(t, f.srv, n.ID(), "agentU", "native", "native")
	down.Store(true)
	m := a.register()
	code, body := errorReply(t, m)
	if code != "503" || m.Header.Get(protocol.HeaderError) != protocol.ErrTextStateUnreadable {
		t.Fatalf("registration while node state is unreadable: code %q, %q (%s), want 503 %q", code, m.Header.Get(protocol.HeaderError), body.Error, protocol.ErrTextStateUnreadable)
	}
	if got := n.Agents(); len(got) != 0 {
		t.Fatalf("registered while node state is unreadable: %+v", got)
	}
	n.mu.Lock()
	reads := len(n.regReads)
	n.mu.Unlock()
	if reads != 0 {
		t.Errorf("%d registration reads left open by the refusal", reads)
	}

	down.Store(false)
	a.mustRegister()
	if _, ok := a.resp.ExistingState["WSTORED"]; !ok || len(a.resp.ExistingState) != 1 {
		t.Fatalf("registration once node state reads again replayed %d workload(s), want WSTORED", len(a.resp.ExistingState))
	}
}
