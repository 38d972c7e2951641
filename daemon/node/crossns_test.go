package node

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// TestAttackTenantStopsAnothersWorkloadOnLaxNexlet: tenant B, as the user an operator
// gives it, sends UNDEPLOY in its own namespace for tenant A's workload, which runs on
// a nexlet on upstream's SDK that answers a stop of a workload it does not hold in the
// request's namespace as done (a version of upstream's native nexlet returns nil for
// it, which the SDK answers stopped). The node knows the workload is A's, yet asked
// the nexlet in B's name and took its answer: it told B "stopping" (naming the node
// that holds A's workload), removed A's running workload from node state (not
// started again after a restart) and remembered it stopped, so A's own stop answered
// "already stopped" while it ran on. Now a stop from another namespace of a workload
// the node placed is "workload not found" at once: the nexlet is not asked, nothing
// is said first, and A's workload stays in state until A stops it.
func TestAttackTenantStopsAnothersWorkloadOnLaxNexlet(t *testing.T) {
	rf := newRogueFixture(t)
	lax := rf.minted("LAXUPSTREAM0", "up", "native", func(a *fakeAgent) {
		a.req.AnswersDirect = false // upstream's SDK: asked on the shared subjects
		a.stopsUnknownAsDone = true
	})
	aWid := deployAs(t, rf.client, "tenant-a", "a-service")
	b := rf.tenant("tenant-b")

	inbox := b.nc.NewInbox()
	replies, err := b.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	stop := &nats.Msg{Subject: protocol.UndeploySubject("tenant-b", aWid), Reply: inbox,
		Data:   mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant-b"}),
		Header: nats.Header{protocol.HeaderProgress: {"1"}}}
	if err := b.nc.PublishMsg(stop); err != nil {
		t.Fatal(err)
	}
	var answer *nats.Msg
	for answer == nil {
		m, err := replies.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("tenant-b's stop of tenant-a's workload: no answer: %v", err)
		}
		if len(m.Data) == 0 {
			t.Errorf("tenant-b was told the node %s is stopping tenant-a's workload (headers %v)", m.Header.Get(protocol.HeaderNode), m.Header)
			continue
		}
		answer = m
	}
	var resp protocol.StopWorkloadResponse
	if err := protocol.Decode(answer.Data, &resp); err != nil || resp.Stopped || resp.Message != protocol.ErrTextWorkloadNotFound {
		t.Errorf("tenant-b's stop of tenant-a's workload answered %q (%v), want %q", answer.Data, err, protocol.ErrTextWorkloadNotFound)
	}
	lax.mu.Lock()
	asked := lax.stopsAskedOf[aWid]
	lax.mu.Unlock()
	if asked != 0 {
		t.Errorf("the nexlet was asked %d times to stop tenant-a's workload in tenant-b's name", asked)
	}
	if !rf.stored("native", aWid) {
		t.Errorf("tenant-a's running workload left node state on tenant-b's stop: a restart would not start it again")
	}

	// A's own stop still stops it: not "already stopped" from a memory B wrote.
	m := request(t, rf.client, protocol.UndeploySubject("tenant-a", aWid), protocol.StopWorkloadRequest{Namespace: "tenant-a"})
	var own protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &own); err != nil || !own.Stopped || own.AlreadyStoppedAt != "" {
		t.Errorf("tenant-a's own stop answered %q (%v), want stopped now", m.Data, err)
	}
	lax.mu.Lock()
	_, runs := lax.workloads[aWid]
	lax.mu.Unlock()
	if runs {
		t.Errorf("tenant-a's workload still runs on the nexlet after tenant-a's own stop")
	}
}

// TestAttackTenantListsAnothersWorkloadOnLaxNexlet: tenant B, as its own user, lists its
// namespace on a node whose nexlet lists every workload it holds, whatever namespace
// it is asked for, without their namespace (upstream's WorkloadSummary makes it
// optional). The node's check of the rows ("never show another namespace's workload to
// a non-system caller, even if a nexlet would") let a row without a namespace through:
// B read tenant A's workload (its id, name and tags). Now a row of a workload the node
// placed counts in the namespace the node placed it in, whatever the row says, and a
// row of a workload of unknown namespace reaches the system namespace only.
func TestAttackTenantListsAnothersWorkloadOnLaxNexlet(t *testing.T) {
	rf := newRogueFixture(t)
	lax := rf.minted("LAXLISTER0", "up", "native", func(a *fakeAgent) { a.listsAll = true })
	aWid := deployAs(t, rf.client, "tenant-a", "a-secret-name")
	b := rf.tenant("tenant-b")
	bWid := deployAs(t, b.nc, "tenant-b", "b-own")

	ids, _ := listOn(t, b.nc, "tenant-b")
	if slices.Contains(ids, aWid) {
		t.Errorf("tenant-b's list shows tenant-a's workload %s: %v", aWid, ids)
	}
	if !slices.Contains(ids, bWid) {
		t.Errorf("tenant-b's list lacks its own workload %s: %v", bWid, ids)
	}
	if ids, _ := listOn(t, rf.client, "tenant-a"); !slices.Equal(ids, []string{aWid}) {
		t.Errorf("tenant-a's list %v, want only its own %s", ids, aWid)
	}
	if ids, _ := listOn(t, rf.client, protocol.SystemNamespace); !slices.Contains(ids, aWid) || !slices.Contains(ids, bWid) {
		t.Errorf("the system namespace's list %v, want both %s and %s", ids, aWid, bWid)
	}

	// A workload the node did not place (held before, say), listed without its
	// namespace: its namespace is unknown, so no tenant sees it.
	lax.mu.Lock()
	lax.workloads["UNPLACED0"] = startReq("tenant-a", "unplaced", `{"cmd":"x"}`)
	lax.mu.Unlock()
	if ids, _ := listOn(t, b.nc, "tenant-b"); slices.Contains(ids, "UNPLACED0") {
		t.Errorf("tenant-b's list shows a workload of unknown namespace: %v", ids)
	}
	if ids, _ := listOn(t, rf.client, protocol.SystemNamespace); !slices.Contains(ids, "UNPLACED0") {
		t.Errorf("the system namespace's list %v lacks the workload of unknown namespace", ids)
	}
}

// TestAttackListedIDReachesResourceReader: a rogue nexlet lists, besides its own
// workload, a row of its making whose id is a path ("..", "../../system.slice"), and
// its tenant asks its namespace's WPING with Nex-Resources. The node handed every row's
// id to its resource reader, which joins it under the workloads' cgroup directory
// (nexd, as root: "workloads/" + id): the tenant read the figures of the cgroup the
// path names (the whole workloads group, a host service). Now only a workload the node
// placed has its figures read.
func TestAttackListedIDReachesResourceReader(t *testing.T) {
	var mu sync.Mutex
	var read []string
	rf := newRogueFixture(t, func(o *Options) {
		o.WorkloadResources = func(id string) (protocol.WorkloadResources, bool) {
			mu.Lock()
			read = append(read, id)
			mu.Unlock()
			return protocol.WorkloadResources{MemoryBytes: 4242}, true
		}
	})
	ns := "tenant-b"
	rf.minted("ROGUEROWS0", "rogue", "native", func(a *fakeAgent) {
		a.extraRows = []protocol.WorkloadSummary{
			{ID: "..", Name: "x", Namespace: &ns, Runtime: "--", WorkloadState: protocol.WorkloadRunning, WorkloadType: "native"},
			{ID: "../../system.slice", Name: "y", Namespace: &ns, Runtime: "--", WorkloadState: protocol.WorkloadRunning, WorkloadType: "native"},
		}
	})
	b := rf.tenant(ns)
	own := deployAs(t, b.nc, ns, "b-own")

	m, err := b.nc.RequestMsg(&nats.Msg{Subject: protocol.WPingSubject(ns),
		Data:   mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: ns, Filter: []string{}}),
		Header: nats.Header{protocol.HeaderResources: {"*"}}}, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ws []protocol.WorkloadSummary
	if err := json.Unmarshal(m.Data, &ws); err != nil {
		t.Fatalf("list: %q: %v", m.Data, err)
	}
	for _, w := range ws {
		switch {
		case w.ID == own && w.Resources == nil:
			t.Errorf("tenant-b's own workload came without its figures")
		case w.ID != own && w.Resources != nil:
			t.Errorf("a row of the rogue's making, id %q, came with figures %+v", w.ID, *w.Resources)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(read, []string{own}) {
		t.Errorf("the resource reader was asked for %q, want only the placed workload %s", read, own)
	}
}

// restartNode plays nexd restarting on the same node state: rf's node stops (its
// nexlets' processes run on, still connected, not told), and a new node with the same
// identity, state store and minter starts in its place, with no nexlet registered.
func (rf *rogueFixture) restartNode(tweaks ...func(*Options)) *Node {
	rf.t.Helper()
	old := rf.nodes[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.Stop(ctx); err != nil {
		rf.t.Fatal(err)
	}
	o := old.o
	o.NC = rf.op.Connect(rf.t, "node-0-again")
	for _, tw := range tweaks {
		tw(&o)
	}
	n, err := New(o)
	if err != nil {
		rf.t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		rf.t.Fatal(err)
	}
	n.SetState(protocol.NodeRunning)
	rf.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Stop(ctx)
	})
	rf.nodes[0] = n
	return n
}

// TestAttackTenantStopsAnothersWorkloadRightAfterRestart: the window
// TestAttackTenantStopsAnothersWorkloadOnLaxNexlet left. Right after nexd restarts,
// the node learnt which namespace a workload it placed belongs to only when the
// workload's nexlet registered again and got it to replay, though node state (read
// at its start) said it all along. Tenant B, as its own user, stops tenant A's
// service in tenant-b in that window: another upstream-style nexlet has registered
// again, so the stop goes out on the shared subject, where A's lax nexlet (still
// connected, not registered yet) takes it for a no-op and answers stopped. The node
// took that answer for the workload it did not know: it removed A's record from node
// state, so A's nexlet, registering next, was not handed it to replay, and A's
// service ran nowhere. Now the node knows the namespaces of what node state holds
// from its start: B's stop is "workload not found", asking no nexlet.
func TestAttackTenantStopsAnothersWorkloadRightAfterRestart(t *testing.T) {
	rf := newRogueFixture(t)
	lax := rf.minted("LAXUPSTREAM0", "up", "native", func(a *fakeAgent) {
		a.req.AnswersDirect = false // upstream's SDK: asked on the shared subjects
		a.stopsUnknownAsDone = true
	})
	other := rf.upstreamNexlet("UPOTHER0", "other", "other")
	aWid := deployAs(t, rf.client, "tenant-a", "a-service")
	b := rf.tenant("tenant-b")

	n := rf.restartNode()
	// The other nexlet's process restarts too and registers first; A's lax nexlet
	// still runs on its old connection and has not registered yet.
	other.kill()
	again := rf.expected(other.id, other.req.Name, other.req.RegisterType)
	again.req.AnswersDirect = false
	again.mustRegister()
	waitHealthy(t, n, other.id)
	// Busy (replaying, say): it does not answer the stop, so the lax nexlet's answer
	// is the one the node takes. Without this the two answers race, and the attack
	// wins about every other try, which a tenant may repeat at will.
	again.mute.Store(true)

	lax.mu.Lock()
	asked := lax.stopsAskedOf[aWid]
	lax.mu.Unlock()
	m := request(t, b.nc, protocol.UndeploySubject("tenant-b", aWid), protocol.StopWorkloadRequest{Namespace: "tenant-b"})
	var resp protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &resp); err != nil || resp.Stopped || resp.Message != protocol.ErrTextWorkloadNotFound {
		t.Errorf("tenant-b's stop of tenant-a's workload right after the restart answered %q (%v), want %q", m.Data, err, protocol.ErrTextWorkloadNotFound)
	}
	lax.mu.Lock()
	asked = lax.stopsAskedOf[aWid] - asked
	lax.mu.Unlock()
	if asked != 0 {
		t.Errorf("tenant-a's nexlet was asked %d times to stop tenant-a's workload in tenant-b's name", asked)
	}
	if !rf.stored("native", aWid) {
		t.Errorf("tenant-a's running workload left node state on tenant-b's stop")
	}

	// A's nexlet restarts and registers: it gets A's service back to replay.
	laxAgain := rf.restarted(lax)
	if !slices.Contains(n.Replayed(), aWid) {
		t.Errorf("tenant-a's workload was not replayed when its nexlet registered again (replayed: %v)", n.Replayed())
	}
	laxAgain.mu.Lock()
	_, runs := laxAgain.workloads[aWid]
	laxAgain.mu.Unlock()
	if !runs {
		t.Errorf("tenant-a's service is not started again on its restarted nexlet")
	}

	// A's own stop stops it.
	m = request(t, rf.client, protocol.UndeploySubject("tenant-a", aWid), protocol.StopWorkloadRequest{Namespace: "tenant-a"})
	var own protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &own); err != nil || !own.Stopped || own.AlreadyStoppedAt != "" {
		t.Errorf("tenant-a's own stop answered %q (%v), want stopped now", m.Data, err)
	}
}

// unreadableStore is a MemStore whose All fails while down (node state out of reach).
type unreadableStore struct {
	*MemStore
	down atomic.Bool
}

func (s *unreadableStore) All(ctx context.Context) (map[string]protocol.StartWorkloadRequest, error) {
	if s.down.Load() {
		return nil, errors.New("state: read bucket NEXNODE: nats: timeout")
	}
	return s.MemStore.All(ctx)
}

// TestAttackTenantStopRightAfterRestartWithStateUnread: as
// TestAttackTenantStopsAnothersWorkloadRightAfterRestart, with node state out of reach
// at nexd's start and at B's stop, so the node cannot tell whose the workload is. It
// neither asks the nexlets nor removes anything: B's stop is refused (503, naming the
// node), and once node state can be read, it is "workload not found" as before; the
// record stays and A's workload is replayed to its nexlet.
func TestAttackTenantStopRightAfterRestartWithStateUnread(t *testing.T) {
	rf := newRogueFixture(t)
	lax := rf.minted("LAXUPSTREAM0", "up", "native", func(a *fakeAgent) {
		a.req.AnswersDirect = false
		a.stopsUnknownAsDone = true
	})
	other := rf.upstreamNexlet("UPOTHER0", "other", "other")
	aWid := deployAs(t, rf.client, "tenant-a", "a-service")
	b := rf.tenant("tenant-b")

	st := &unreadableStore{MemStore: rf.stores[0]}
	st.down.Store(true)
	n := rf.restartNode(func(o *Options) { o.Store = st })
	other.kill()
	again := rf.expected(other.id, other.req.Name, other.req.RegisterType)
	again.req.AnswersDirect = false
	again.mustRegister()
	waitHealthy(t, n, other.id)
	again.mute.Store(true) // as in TestAttackTenantStopsAnothersWorkloadRightAfterRestart

	stop := func() *nats.Msg {
		return request(t, b.nc, protocol.UndeploySubject("tenant-b", aWid), protocol.StopWorkloadRequest{Namespace: "tenant-b"})
	}
	m := stop()
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "503" || m.Header.Get(protocol.HeaderNode) != n.ID() {
		t.Errorf("tenant-b's stop with node state unread answered %q (code %q, node %q), want a 503 naming the node", m.Data, code, m.Header.Get(protocol.HeaderNode))
	}
	st.down.Store(false)
	m = stop()
	var resp protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &resp); err != nil || resp.Stopped || resp.Message != protocol.ErrTextWorkloadNotFound {
		t.Errorf("tenant-b's stop once node state is read answered %q (%v), want %q", m.Data, err, protocol.ErrTextWorkloadNotFound)
	}
	lax.mu.Lock()
	asked := lax.stopsAskedOf[aWid]
	lax.mu.Unlock()
	if asked != 0 {
		t.Errorf("tenant-a's nexlet was asked %d times to stop tenant-a's workload in tenant-b's name", asked)
	}
	if !rf.stored("native", aWid) {
		t.Errorf("tenant-a's running workload left node state on tenant-b's stop")
	}
	rf.restarted(lax)
	if !slices.Contains(n.Replayed(), aWid) {
		t.Errorf("tenant-a's workload was not replayed when its nexlet registered again (replayed: %v)", n.Replayed())
	}
}

// TestAttackTenantClonesAnothersWorkloadOnLaxNexlet: tenant B, as its own user, asks in
// its own namespace for the clone of tenant A's workload, which runs on a nexlet that
// keeps its workloads by id and answers GETWORKLOAD in the request's namespace. The
// node asked that nexlet in B's name and checked only the namespace of its answer:
// B got A's start request (its name and run request), to deploy as its own. Now a
// clone from another namespace of a workload the node placed is silence, as for an
// absent one, and the nexlet is not asked; A's own clone still answers.
func TestAttackTenantClonesAnothersWorkloadOnLaxNexlet(t *testing.T) {
	rf := newRogueFixture(t)
	lax := rf.minted("LAXCLONER0", "up", "native", func(a *fakeAgent) { a.clonesAnyNamespace = true })
	aWid := deployAs(t, rf.client, "tenant-a", "a-secret-name")
	b := rf.tenant("tenant-b")

	m, err := b.nc.Request(protocol.CloneSubject("tenant-b", aWid), mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "tenant-b"}), 2*time.Second)
	switch {
	case err == nil:
		t.Errorf("tenant-b's clone of tenant-a's workload answered %s", m.Data)
	case !errors.Is(err, nats.ErrTimeout):
		t.Errorf("tenant-b's clone of tenant-a's workload: %v, want silence (a timeout)", err)
	}
	lax.mu.Lock()
	asked := lax.clonesAskedOf[aWid]
	lax.mu.Unlock()
	if asked != 0 {
		t.Errorf("the nexlet was asked %d times for tenant-a's workload in tenant-b's name", asked)
	}
	m = request(t, rf.client, protocol.CloneSubject("tenant-a", aWid), protocol.CloneWorkloadRequest{Namespace: "tenant-a"})
	var swr protocol.StartWorkloadRequest
	if err := protocol.Decode(m.Data, &swr); err != nil || swr.Name != "a-secret-name" {
		t.Errorf("tenant-a's own clone answered %q (%v)", m.Data, err)
	}
}
