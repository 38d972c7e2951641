package node

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestBoundNexletIdentity: a supervised nexlet proves its start with its per-start key;
// a live nexlet's name cannot be taken; a remote nexlet needs its listed key, name and
// type; a nexlet instance gets back only its own workloads.
func TestBoundNexletIdentity(t *testing.T) {
	remoteKey, _ := nkeys.CreateUser()
	remotePub, _ := remoteKey.PublicKey()
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.AllowRemoteRegistration = true
		o.RemoteNexlets = []RemoteNexlet{{Name: "wasm", Type: "wasm", PublicKey: remotePub}}
	})
	n := f.nodes[0]
	key, _ := nkeys.CreateUser()
	pub, _ := key.PublicKey()
	other, _ := nkeys.CreateUser()

	code := func(a *fakeAgent) string {
		t.Helper()
		return a.register().Header.Get(protocol.HeaderErrorCode)
	}
	n.ExpectAgent("native0", "native")
	n.SetAgentKey("native0", pub)
	unsigned := newFakeAgent(t, f.srv, n.ID(), "native0", "go_exec", "native")
	if c := code(unsigned); c != "403" {
		t.Fatalf("unsigned registration of a supervised nexlet: code %q", c)
	}
	wrong := newFakeAgent(t, f.srv, n.ID(), "native0", "go_exec", "native")
	wrong.key = other
	if c := code(wrong); c != "403" {
		t.Fatalf("registration signed by another key: code %q", c)
	}
	real := newFakeAgent(t, f.srv, n.ID(), "native0", "go_exec", "native")
	real.key = key
	real.mustRegister()

	// Same name under another id (remote registration is on): taken.
	thief := newFakeAgent(t, f.srv, n.ID(), "thief0", "go_exec", "native")
	thief.key = remoteKey
	if c := code(thief); c != "403" && c != "409" {
		t.Fatalf("registration under a live nexlet's name: code %q", c)
	}
	if _, err := n.nameFree("thief0", "remote:wasm", remotePub, "go_exec"); err == nil {
		t.Fatal("nameFree: a live nexlet's name is free")
	}
	// Remote: listed key but another name or type; unlisted key; the right one.
	liar := newFakeAgent(t, f.srv, n.ID(), "remote0", "wasm", "native")
	liar.key = remoteKey
	if c := code(liar); c != "403" {
		t.Fatalf("remote key listed for wasm/wasm registered as wasm/native: code %q", c)
	}
	stranger := newFakeAgent(t, f.srv, n.ID(), "remote1", "wasm", "wasm")
	stranger.key = other
	if c := code(stranger); c != "403" {
		t.Fatalf("remote nexlet with an unlisted key: code %q", c)
	}
	remote := newFakeAgent(t, f.srv, n.ID(), "remote2", "wasm", "wasm")
	remote.key = remoteKey
	remote.mustRegister()

	// Two instances of one type: each gets back only its own workload.
	n.ExpectAgent("second0", "second")
	b := newFakeAgent(t, f.srv, n.ID(), "second0", "other_exec", "native")
	b.mustRegister() // no key set for this slot: unsigned_registration
	n.mu.Lock()
	n.owned["wa"] = ownership{typ: "native", owner: "local:native"}
	n.owned["wb"] = ownership{typ: "native", owner: "local:second"}
	n.mu.Unlock()
	for _, id := range []string{"wa", "wb"} {
		if err := f.stores[0].Put(t.Context(), "native", id, startReq("tenant", id, `{}`)); err != nil {
			t.Fatal(err)
		}
	}
	n.RemoveAgent("second0", "restarting")
	again := newFakeAgent(t, f.srv, n.ID(), "second0", "other_exec", "native")
	again.mustRegister()
	if _, ok := again.resp.ExistingState["wb"]; !ok || len(again.resp.ExistingState) != 1 {
		t.Fatalf("replay to the second instance: %v", again.resp.ExistingState)
	}
	if _, _, code, err := n.renewOwned("native0", "wb", "tenant"); code != 404 {
		t.Fatalf("the first instance renews the second's workload: %d %v", code, err)
	}
	if _, _, code, err := n.renewOwned("second0", "wb", "tenant"); err != nil {
		t.Fatalf("the second instance does not renew its workload: %d %v", code, err)
	}
}

// TestReconcileOnRegistration: a nexlet that says what it holds gets back its services
// and the jobs it holds; a stored job it does not hold ran before and leaves node state
// without being replayed. Records carry their owner, so a node that never saw the
// deploys (a restarted nexd) still hands each instance only its own; a client cannot
// choose the owner.
func TestReconcileOnRegistration(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	st := f.stores[0]
	put := func(id string, l protocol.Lifecycle, owner string) {
		req := startReq("tenant", id, `{}`)
		req.WorkloadLifecycle, req.Owner = l, owner
		if err := st.Put(t.Context(), "native", id, req); err != nil {
			t.Fatal(err)
		}
	}
	put("svc", protocol.LifecycleService, "local:native")
	put("heldjob", protocol.LifecycleJob, "local:native")
	put("donejob", protocol.LifecycleJob, "local:native")
	put("other", protocol.LifecycleJob, "local:second")
	held := []string{"heldjob"}
	a := f.healthyAgent(n, "native0", "native", "native", func(a *fakeAgent) { a.req.Workloads = &held })
	got := slices.Sorted(maps.Keys(a.resp.ExistingState))
	if !slices.Equal(got, []string{"heldjob", "svc"}) {
		t.Fatalf("replayed %v, want heldjob and svc", got)
	}
	for id, w := range a.resp.ExistingState {
		if w.Request.Owner != "" {
			t.Errorf("replay of %s carries the node's owner record %q", id, w.Request.Owner)
		}
	}
	left, _ := st.ByType(t.Context(), "native")
	if _, ok := left["donejob"]; ok {
		t.Fatal("the job its nexlet does not hold is still in node state")
	}
	if _, ok := left["other"]; !ok {
		t.Fatal("another instance's job was removed")
	}

	// A deploy records the instance that runs it, whatever the client sent.
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	req := startReq("tenant", "w", `{"cmd":"x"}`)
	req.Owner = "local:second"
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy reply %q %v", m.Data, err)
	}
	left, _ = st.ByType(t.Context(), "native")
	if o := left[started.ID].Owner; o != "local:native" {
		t.Fatalf("deployed workload recorded with owner %q, want local:native", o)
	}
	a.mu.Lock()
	sent := a.workloads[started.ID].Owner
	a.mu.Unlock()
	if sent != "" {
		t.Fatalf("the nexlet got the owner %q in its start request", sent)
	}
}

// TestRogueNexletBindsNamesWithoutEnd: a rogue supervised nexlet, signed with its
// start's key, registers with its minted user under ever new names. Each name it
// registers under is reserved for it and kept for the next run (OnNameBound:
// <state_dir>/nexlets/<name>.names). It binds them both ways the node serves one
// nexlet's registrations without end over time: registering again while registered,
// as many times as the bound of those lets through at once (its first and
// agentRenewBurst more; that bound slows it to 8 more over each lifetime of its user,
// it does not end it), and by restarting, which the bound never charges (a new start
// signs with a new key; its first registration is not one again), one new name each
// start. Of 40 new names the first MaxBoundNames are taken, every later one refused
// (403, saying so), none dropped by the bound (MaxBoundNames refused them, not the
// rate), a name it bound already is still taken, and the names kept are
// MaxBoundNames. Before, all 40 were taken and kept: the file (rewritten whole at
// each) and the node's map grew without end.
func TestRogueNexletBindsNamesWithoutEnd(t *testing.T) {
	var kept []string
	var mu sync.Mutex
	rf := newRogueFixture(t, func(o *Options) {
		o.OnNameBound = func(_, name string) { mu.Lock(); kept = append(kept, name); mu.Unlock() }
	})
	n := rf.nodes[0]
	start := func() *fakeAgent {
		a := rf.expected("rogue0", "rogue", "rogue")
		signedStart(n, true)(a)
		return a
	}
	const names = 40
	tried, taken, refused := 0, 0, 0
	register := func(a *fakeAgent, name string) {
		t.Helper()
		a.mu.Lock() // its heartbeats read it
		a.req.Name = name
		a.mu.Unlock()
		m := a.register()
		switch code := m.Header.Get(protocol.HeaderErrorCode); {
		case code == "":
			taken++
		case code == "403" && strings.Contains(m.Header.Get(protocol.HeaderError)+string(m.Data), "the most it may"):
			refused++
		default:
			t.Fatalf("registration under %s answered %s %s %s", name, code, m.Header.Get(protocol.HeaderError), m.Data)
		}
	}
	restart := func(a *fakeAgent) *fakeAgent {
		a.kill()
		n.RemoveAgent(a.id, "exited") // as its supervisor does when it sees the exit
		return start()
	}
	rogue := start()
	for range 1 + agentRenewBurst {
		register(rogue, fmt.Sprintf("name-%d", tried))
		tried++
	}
	for ; tried < names; tried++ {
		rogue = restart(rogue)
		register(rogue, fmt.Sprintf("name-%d", tried))
	}
	rogue = restart(rogue)
	rogue.mu.Lock()
	rogue.req.Name = "name-3"
	rogue.mu.Unlock()
	if m := rogue.register(); m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Errorf("registration under a name it bound already refused: %s %s", m.Header.Get(protocol.HeaderError), m.Data)
	}
	mu.Lock()
	defer mu.Unlock()
	dropped := n.ReregistrationsDropped()
	t.Logf("%d new names tried (%d registering again, %d after restarts): %d taken, %d refused, %d dropped by the bound of registrations again, %d kept for the next run",
		names, agentRenewBurst, names-1-agentRenewBurst, taken, refused, dropped, len(kept))
	if taken != MaxBoundNames || refused != names-MaxBoundNames || len(kept) != MaxBoundNames || dropped != 0 {
		t.Errorf("%d names taken, %d refused, %d kept, %d dropped; want %d, %d, %d, 0", taken, refused, len(kept), dropped, MaxBoundNames, names-MaxBoundNames, MaxBoundNames)
	}
}

// TestReconcileByStartMemory: a nexlet that names its memory of starts (nexd_memory)
// gets back a stored job it does not hold only when the job's start was never confirmed
// (nexd_started) and the job was recorded under that same memory: its start never
// reached it (its nexd died between the record and the send). A confirmed job, one
// recorded under an older memory (a reboot since) and one recorded before memories
// (an older nexd's) are taken for jobs that ran, as before: removed, not replayed. A
// held job's record gets its start mark. A deploy records the nexlet's memory and,
// once answered, marks a job started, whatever the client sent; neither reaches a
// nexlet. Before, the unconfirmed job of the nexlet's own memory was removed, never
// run.
func TestReconcileByStartMemory(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	st := f.stores[0]
	put := func(id, memory string, started bool) {
		req := startReq("tenant", id, `{}`)
		req.WorkloadLifecycle, req.Owner, req.Memory, req.Started = protocol.LifecycleJob, "local:native", memory, started
		if err := st.Put(t.Context(), "native", id, req); err != nil {
			t.Fatal(err)
		}
	}
	put("neversent", "m1", false)
	put("confirmed", "m1", true)
	put("oldermemory", "m0", false)
	put("beforememories", "", false)
	put("heldunmarked", "m1", false)
	held := []string{"heldunmarked"}
	a := f.healthyAgent(n, "native0", "native", "native", func(a *fakeAgent) { a.req.Workloads, a.req.Memory = &held, "m1" })
	got := slices.Sorted(maps.Keys(a.resp.ExistingState))
	if !slices.Equal(got, []string{"heldunmarked", "neversent"}) {
		t.Fatalf("replayed %v, want heldunmarked and neversent", got)
	}
	for id, w := range a.resp.ExistingState {
		if w.Request.Memory != "" || w.Request.Started {
			t.Errorf("replay of %s carries the node's record of memory %q, started %v", id, w.Request.Memory, w.Request.Started)
		}
	}
	left, _ := st.ByType(t.Context(), "native")
	for _, id := range []string{"confirmed", "oldermemory", "beforememories"} {
		if _, ok := left[id]; ok {
			t.Errorf("job %s, not held, is still in node state", id)
		}
	}
	if _, ok := left["neversent"]; !ok {
		t.Error("the job that never reached its nexlet left node state")
	}
	testkit.Eventually(t, "the held job's record marked started", func() bool {
		left, _ := st.ByType(t.Context(), "native")
		return left["heldunmarked"].Started
	})

	// A deploy records the nexlet's memory, a client's values are ignored, and the
	// answered job is marked started; the nexlet gets neither.
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	req := startReq("tenant", "j", `{"cmd":"x"}`)
	req.WorkloadLifecycle, req.Memory, req.Started = protocol.LifecycleJob, "forged", true
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy reply %q %v", m.Data, err)
	}
	testkit.Eventually(t, "the deployed job's record marked started", func() bool {
		left, _ := st.ByType(t.Context(), "native")
		return left[started.ID].Started
	})
	left, _ = st.ByType(t.Context(), "native")
	if mem := left[started.ID].Memory; mem != "m1" {
		t.Errorf("deployed job recorded under memory %q, want the nexlet's m1", mem)
	}
	a.mu.Lock()
	sent := a.workloads[started.ID]
	a.mu.Unlock()
	if sent.Memory != "" || sent.Started {
		t.Errorf("the nexlet got memory %q, started %v in its start request", sent.Memory, sent.Started)
	}
}
