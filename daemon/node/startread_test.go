package node

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// heldStore is a MemStore whose All waits until released (node state slow to answer,
// a big bucket) or its context ends; entered is told of each call, returned of each
// return.
type heldStore struct {
	*MemStore
	release  chan struct{}
	entered  chan struct{}
	returned chan error
}

func newHeldStore(m *MemStore) *heldStore {
	return &heldStore{MemStore: m, release: make(chan struct{}),
		entered: make(chan struct{}, 16), returned: make(chan error, 16)}
}

func (s *heldStore) All(ctx context.Context) (map[string]protocol.StartWorkloadRequest, error) {
	s.entered <- struct{}{}
	select {
	case <-s.release:
		all, err := s.MemStore.All(ctx)
		s.returned <- err
		return all, err
	case <-ctx.Done():
		s.returned <- ctx.Err()
		return nil, ctx.Err()
	}
}

// TestAttackTenantStopWhileStartReadUnderWay: the node reads node state's namespaces
// beside serving, not before (with thousands of records the read was tens of ms on
// nexd's way to READY). A tenant's stop of another namespace's workload sent while
// that read is still under way, right after a restart (as in
// TestAttackTenantStopsAnothersWorkloadRightAfterRestart), waits for it: nothing is
// asked of the lax nexlet before the read ends, and then it is "workload not found".
// The node's Start returned with the read held, and the stop asked for no read of its
// own (one read, the start's).
func TestAttackTenantStopWhileStartReadUnderWay(t *testing.T) {
	rf := newRogueFixture(t)
	lax := rf.minted("LAXUPSTREAM0", "up", "native", func(a *fakeAgent) {
		a.req.AnswersDirect = false
		a.stopsUnknownAsDone = true
	})
	other := rf.upstreamNexlet("UPOTHER0", "other", "other")
	aWid := deployAs(t, rf.client, "tenant-a", "a-service")
	b := rf.tenant("tenant-b")

	st := newHeldStore(rf.stores[0])
	n := rf.restartNode(func(o *Options) {
		o.Store = st
		o.FanoutTimeout = 10 * time.Second // the read is held for the test, not timed out
	})
	select {
	case <-st.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the node's start read no node state")
	}
	other.kill()
	again := rf.expected(other.id, other.req.Name, other.req.RegisterType)
	again.req.AnswersDirect = false
	again.mustRegister()
	waitHealthy(t, n, other.id)
	again.mute.Store(true) // as in TestAttackTenantStopsAnothersWorkloadRightAfterRestart

	answer := make(chan *nats.Msg, 1)
	go func() {
		m, err := b.nc.Request(protocol.UndeploySubject("tenant-b", aWid),
			mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant-b"}), 20*time.Second)
		if err != nil {
			t.Errorf("tenant-b's stop: %v", err)
		}
		answer <- m
	}()
	// B's stop is in the node's hands before the read ends: its handler running (it
	// waits), or its answer (it did not).
	if !testkit.WaitFor(10*time.Second, func() bool {
		return len(answer) > 0 || slices.ContainsFunc(n.runningNow(), func(h string) bool {
			return strings.Contains(h, ".UNDEPLOY.")
		})
	}) {
		t.Fatalf("tenant-b's stop neither answered nor handled by the node (handlers: %v)", n.runningNow())
	}
	select {
	case m := <-answer:
		t.Fatalf("tenant-b's stop answered %q before node state was read", m.Data)
	case <-time.After(200 * time.Millisecond):
	}
	lax.mu.Lock()
	asked := lax.stopsAskedOf[aWid]
	lax.mu.Unlock()
	if asked != 0 {
		t.Errorf("tenant-a's nexlet was asked %d times to stop tenant-a's workload in tenant-b's name before node state was read", asked)
	}

	close(st.release)
	var m *nats.Msg
	select {
	case m = <-answer:
	case <-time.After(20 * time.Second):
		t.Fatal("tenant-b's stop not answered after node state was read")
	}
	var resp protocol.StopWorkloadResponse
	if m == nil {
		t.FailNow()
	}
	if err := protocol.Decode(m.Data, &resp); err != nil || resp.Stopped || resp.Message != protocol.ErrTextWorkloadNotFound {
		t.Errorf("tenant-b's stop sent during the start's read answered %q (%v), want %q", m.Data, err, protocol.ErrTextWorkloadNotFound)
	}
	lax.mu.Lock()
	asked = lax.stopsAskedOf[aWid]
	lax.mu.Unlock()
	if asked != 0 {
		t.Errorf("tenant-a's nexlet was asked %d times to stop tenant-a's workload in tenant-b's name", asked)
	}
	if !rf.stored("native", aWid) {
		t.Errorf("tenant-a's running workload left node state on tenant-b's stop")
	}
	if calls := len(st.entered); calls != 0 {
		t.Errorf("node state was read %d more times after the start's read (the stop should wait for it)", calls)
	}
	rf.restarted(lax)
	if !slices.Contains(n.Replayed(), aWid) {
		t.Errorf("tenant-a's workload was not replayed when its nexlet registered again (replayed: %v)", n.Replayed())
	}
}

// TestNodeStopEndsStartRead: the start's read of node state is the node's own
// goroutine: a Stop while it hangs (node state out of reach) cancels it and waits
// for it, within the stop's bound and without leaving a handler behind.
func TestNodeStopEndsStartRead(t *testing.T) {
	st := newHeldStore(NewMemStore())
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = st
		o.FanoutTimeout = time.Minute
		o.StopWait = 10 * time.Second
	})
	select {
	case <-st.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the node's start read no node state")
	}
	select {
	case err := <-st.returned:
		t.Fatalf("the node's Start returned only once its read of node state ended (%v): the read is on its way to serving", err)
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := f.nodes[0].Stop(ctx); err != nil {
		t.Errorf("node stop with the start's read of node state hanging: %v", err)
	}
	select {
	case err := <-st.returned:
		if err == nil {
			t.Errorf("the start's read ended without error, want cancelled by the stop")
		}
	default:
		t.Errorf("the start's read of node state still runs after the node's Stop returned")
	}
}

// TestRecordedForgottenDuringRead: a workload that leaves node state while a read of
// it is under way (listed before it went) is not brought back by that read's outcome.
func TestRecordedForgottenDuringRead(t *testing.T) {
	n := &Node{recorded: recordedNS{ns: map[string]string{}}}
	ch := n.beginRecordedRead()
	if ch == nil {
		t.Fatal("no read announced on a node that has read nothing")
	}
	if again := n.beginRecordedRead(); again != nil {
		t.Fatal("a second read announced while one is under way")
	}
	n.forgetRecorded("GONE")
	all := map[string]protocol.StartWorkloadRequest{
		"native_GONE": startReq("tenant-a", "gone", ""),
		"native_KEPT": startReq("tenant-a", "kept", ""),
	}
	if err := n.readRecordedEnded(ch, all, nil); err != nil {
		t.Fatal(err)
	}
	if ns := n.recordedLookup("GONE"); ns != "" {
		t.Errorf("a workload forgotten during the read is recorded in %q again", ns)
	}
	if ns := n.recordedLookup("KEPT"); ns != "tenant-a" {
		t.Errorf("the read recorded %q for a workload it listed, want tenant-a", ns)
	}
	select {
	case <-ch:
	default:
		t.Errorf("the read's waiters were not told it ended")
	}
}
