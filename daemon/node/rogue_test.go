package node

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// The attacks of a rogue nexlet: a nexlet that holds the NATS user its node minted for
// it (an operator-mode server enforces that user's permissions) and answers the node's
// fan-outs in another nexlet's name. Each test fails as an attack before the node
// named repliers by the subject they answer on instead of by their agentId header.

// rogueFixture is one node on an operator-mode server with the signing-key minter:
// every nexlet connects as the users the node minted for it.
type rogueFixture struct {
	*fixture
	op    *testnats.Operator
	m     *mint.SigningKeyMinter
	rogue *fakeAgent // rogueSetup's
}

func newRogueFixture(t *testing.T, tweaks ...func(*Options)) *rogueFixture {
	t.Helper()
	return newRogueFixtureMinting(t, mint.Options{}, tweaks...)
}

// newRogueFixtureMinting is newRogueFixture with a minter made with mo (its Servers
// set to the fixture's server).
func newRogueFixtureMinting(t *testing.T, mo mint.Options, tweaks ...func(*Options)) *rogueFixture {
	t.Helper()
	op := testnats.StartOperator(t, nil)
	n, st, m := startMintingNode(t, op, mo, "node-0", tweaks...)
	f := &fixture{t: t, srv: op.Server, client: op.Connect(t, "client"), nodes: []*Node{n}, stores: []*MemStore{st}}
	return &rogueFixture{fixture: f, op: op, m: m}
}

// revokingOperator starts an operator-mode server whose accounts a directory resolver
// holds (as the embedded server's) and makes a revoker that revokes users of its
// application account through its system account, as nexd's does, keeping each
// revocation for retain.
func revokingOperator(t *testing.T, retain time.Duration) (*testnats.Operator, *mint.AccountRevoker) {
	t.Helper()
	op := testnats.StartOperatorDir(t)
	return op, mint.NewSystemAccountRevoker(op.ConnectSystem(t, "sys"), op.OperatorKP, op.Account, retain)
}

// newSigningMinter is a signing-key minter of op's application account made with mo
// (its Servers set to op's server).
func newSigningMinter(t *testing.T, op *testnats.Operator, mo mint.Options) *mint.SigningKeyMinter {
	t.Helper()
	mo.Servers = []string{op.Server.ClientURL()}
	m, err := mint.NewSigningKeyMinter(op.SigningSeed, op.Account, mo)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// startMintingNode starts a running node on op's server with a signing-key minter made
// with mo (its Servers set to the server), stopped at the test's end.
func startMintingNode(t *testing.T, op *testnats.Operator, mo mint.Options, name string, tweaks ...func(*Options)) (*Node, *MemStore, *mint.SigningKeyMinter) {
	t.Helper()
	m := newSigningMinter(t, op, mo)
	kp, _ := nkeys.CreateServer()
	xk, _ := nkeys.CreateCurveKeys()
	st := NewMemStore()
	o := Options{NC: op.Connect(t, name), NodeKey: kp, XKey: xk, Name: name, Nexus: "testnexus",
		Version: "0.1.0", Minter: m, Store: st, Logger: testLogger(t),
		HeartbeatInterval: 200 * time.Millisecond, HealthTick: 50 * time.Millisecond,
		FanoutTimeout: time.Second, CloneTimeout: time.Second, StopTimeout: 2 * time.Second}
	for _, tw := range tweaks {
		tw(&o)
	}
	n, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	n.SetState(protocol.NodeRunning)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Stop(ctx)
	})
	return n, st, m
}

// putObject stores data as object name in a new object store bucket, as its tenant
// would, through the fixture's unrestricted client.
func (rf *rogueFixture) putObject(ctx context.Context, bucket, name string, data []byte) {
	rf.t.Helper()
	js, err := jetstream.New(rf.client)
	if err != nil {
		rf.t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: bucket})
	if err != nil {
		rf.t.Fatal(err)
	}
	if _, err := obs.PutBytes(ctx, name, data); err != nil {
		rf.t.Fatal(err)
	}
}

// dial connects as the user cd holds, with its private inbox.
func (rf *rogueFixture) dial(cd protocol.NatsConnectionData) *nats.Conn {
	return testnats.Connect(rf.t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.CustomInboxPrefix(cd.InboxPrefix))
}

// minted registers a fake nexlet as a local nexlet does: with the registration user
// its node minted for id, then serving as the nexlet user the registration handed it.
func (rf *rogueFixture) minted(id, name, typ string, tweak func(*fakeAgent)) *fakeAgent {
	rf.t.Helper()
	return rf.mintedOn(rf.nodes[0], rf.m, id, name, typ, tweak)
}

// mintedOn is minted on node n, whose minter is m.
func (rf *rogueFixture) mintedOn(n *Node, m *mint.SigningKeyMinter, id, name, typ string, tweak func(*fakeAgent)) *fakeAgent {
	rf.t.Helper()
	a := rf.expectedOn(n, m, id, name, typ)
	if tweak != nil {
		tweak(a)
	}
	a.mustRegister()
	waitHealthy(rf.t, n, id)
	return a
}

// expected is a fake nexlet the node supervises as name under id, on the registration
// user minted for id, not registered yet.
func (rf *rogueFixture) expected(id, name, typ string) *fakeAgent {
	rf.t.Helper()
	return rf.expectedOn(rf.nodes[0], rf.m, id, name, typ)
}

func (rf *rogueFixture) expectedOn(n *Node, m *mint.SigningKeyMinter, id, name, typ string) *fakeAgent {
	rf.t.Helper()
	n.ExpectAgent(id, name)
	rc, err := m.MintRegister(id, n.ID())
	if err != nil {
		rf.t.Fatal(err)
	}
	a := newFakeAgentOn(rf.t, rf.dial(rc), n.ID(), id, name, typ)
	a.reconnect = rf.dial
	return a
}

// forgedRun is the run request a rogue's forged answers carry.
const forgedRun = `{"cmd":"forged"}`

// forge makes rogue answer, besides its own handlers, every QUERYWORKLOADS,
// STOPWORKLOAD and GETWORKLOAD it may receive (the node's shared subjects and those
// of its own agent id) in victim's name, about the workload wid: a list holding it, a
// confirmed stop, and a start request of the rogue's making.
func forge(t *testing.T, rogue *fakeAgent, victim, wid string) {
	t.Helper()
	named := nats.Header{protocol.HeaderAgentID: {victim}}
	ns := "tenant"
	list := js([]protocol.WorkloadSummary{{ID: wid, Name: "forged", Namespace: &ns, Runtime: "--",
		StartTime: time.Now().UTC().Format(time.RFC3339), WorkloadLifecycle: string(protocol.LifecycleService),
		WorkloadState: protocol.WorkloadRunning, WorkloadType: "native"}})
	stop := js(protocol.StopWorkloadResponse{ID: wid, Stopped: true, Message: "forged", WorkloadType: "native"})
	get := js(protocol.StartWorkloadRequest{Description: "forged", Name: "forged", Namespace: ns, RunRequest: forgedRun,
		Tags: map[string]string{}, WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "native"})
	p := protocol.AgentPrefix(rogue.nodeID)
	for _, s := range []struct {
		subject string
		body    []byte
	}{
		{p + ".QUERYWORKLOADS", list}, {p + "." + rogue.id + ".QUERYWORKLOADS", list},
		{p + ".STOPWORKLOAD.*", stop}, {p + "." + rogue.id + ".STOPWORKLOAD.*", stop},
		{p + ".GETWORKLOAD.*", get}, {p + "." + rogue.id + ".GETWORKLOAD.*", get},
	} {
		body := s.body
		if _, err := rogue.nc.Subscribe(s.subject, func(m *nats.Msg) {
			_ = m.RespondMsg(&nats.Msg{Header: named, Data: body})
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := rogue.nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// rogueSetup: victim (agent0, native) runs workload wid in tenant and then hangs (it
// answers nothing); rogue0 (type rogue) forges in agent0's name. shared: the rogue
// registers without AnswersDirect, as upstream's SDK does, and is asked on the shared
// subjects, where anyone's answer names no one.
func rogueSetup(t *testing.T, shared bool) (rf *rogueFixture, victim *fakeAgent, wid string) {
	rf = newRogueFixture(t)
	victim = rf.minted("agent0", "native-nexlet", "native", nil)
	rogue := rf.minted("rogue0", "rogue", "rogue", func(a *fakeAgent) { a.req.AnswersDirect = !shared })
	rf.rogue = rogue
	wid = rf.deployOne("tenant")
	forge(t, rogue, victim.id, wid)
	// Only forged answers from the rogue: asked on its own subject, its honest answer
	// would come first and pass for its token, and the forged one would be dropped
	// before the ownership check it is here to try.
	rogue.mute.Store(true)
	victim.mute.Store(true)
	return rf, victim, wid
}

// TestRogueNexletListsInAnothersName: the rogue answers the list fan-out in the hung
// victim's name, with the victim's workload. Before, the node counted the victim heard
// (its agentId header) and called the list whole: a lame duck --wait or a drain would
// trust a list that lacks what the victim runs. Now the victim is named missing and no
// row of its workload comes from the rogue.
func TestRogueNexletListsInAnothersName(t *testing.T) {
	forEachRogue(t, func(t *testing.T, shared bool) {
		rf, victim, wid := rogueSetup(t, shared)
		out, missing, err := rf.nodes[0].queryWorkloads(context.Background(), protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(missing, func(m protocol.MissingNexlet) bool { return m.ID == victim.id }) {
			t.Errorf("missing %+v: the hung %s is not named; the rogue answered in its name", missing, victim.id)
		}
		for _, w := range out {
			if w.ID == wid {
				t.Errorf("list has %s's workload %s (%q), which only the rogue answered", victim.id, wid, w.Name)
			}
		}
	})
}

// TestRogueNexletStopsAnothersWorkload: the rogue confirms the stop of the hung
// victim's workload. Before, the client was told it stopped and the node removed it
// from node state while the victim still ran it: a workload the node lost. Now only
// the owning nexlet's confirmation counts.
func TestRogueNexletStopsAnothersWorkload(t *testing.T) {
	forEachRogue(t, func(t *testing.T, shared bool) {
		rf, victim, wid := rogueSetup(t, shared)
		stored := rf.stopKept(wid)
		if victim.workloadCount() != 1 {
			t.Fatal("the victim no longer runs the workload")
		}
		if !stored || !rf.nodes[0].owns(wid) {
			t.Errorf("workload %s, still run by %s, left node state (stored %v, owned %v)", wid, victim.id, stored, rf.nodes[0].owns(wid))
		}
	})
}

// TestRogueNexletAnswersCloneForAnother: the rogue answers a clone of the victim's
// workload with a start request of its own making. Before, the node relayed it, and the
// client would deploy what the rogue chose under its own credentials. Now only the
// owning nexlet's answer is relayed: with the victim hung, none; with it answering,
// its own.
func TestRogueNexletAnswersCloneForAnother(t *testing.T) {
	forEachRogue(t, func(t *testing.T, shared bool) {
		rf, victim, wid := rogueSetup(t, shared)
		clone := func() *nats.Msg {
			m, err := rf.client.Request(protocol.CloneSubject("tenant", wid), js(protocol.CloneWorkloadRequest{Namespace: "tenant"}), 3*time.Second)
			if err != nil {
				return nil
			}
			return m
		}
		check := func(what string, m *nats.Msg) {
			if m == nil {
				return
			}
			var swr protocol.StartWorkloadRequest
			if err := json.Unmarshal(m.Data, &swr); err != nil {
				t.Fatalf("%s: clone reply %q: %v", what, m.Data, err)
			}
			if swr.RunRequest == forgedRun {
				t.Errorf("%s: clone answered with the rogue's start request %+v", what, swr)
			}
		}
		check("victim hung", clone())
		victim.mute.Store(false)
		m := clone()
		if m == nil {
			t.Fatal("victim answering: no clone answer")
		}
		check("victim answering", m)
	})
}

// forEachRogue runs an attack with the rogue asked on its own subjects (as nexd's
// nexlets register) and on the shared ones (as upstream's SDK registers).
func forEachRogue(t *testing.T, attack func(t *testing.T, shared bool)) {
	for _, shared := range []bool{false, true} {
		name := "direct"
		if shared {
			name = "shared"
		}
		t.Run(name, func(t *testing.T) { attack(t, shared) })
	}
}

// TestRogueNexletCannotSpeakAsAnother: the rest of the agent plane, audited with the same
// minted users. The rogue's user may publish only under its own agent id, so it can
// neither register, heartbeat, end a workload, nor renew credentials as the victim; under
// its own id the node refuses to end or renew the victim's workload (ownership is per
// nexlet instance). Not a gap this change closed: a guard that it stays closed.
func TestRogueNexletCannotSpeakAsAnother(t *testing.T) {
	rf, victim, wid := rogueSetup(t, false)
	n := rf.nodes[0]
	victim.stopHeartbeats()
	rogue := rf.rogue
	beat := func() time.Time {
		for _, a := range n.Agents() {
			if a.ID == victim.id {
				return a.LastHeartbeat
			}
		}
		t.Fatal("victim not registered")
		return time.Time{}
	}
	before := beat()
	ask := func(subject string, body any) (*nats.Msg, error) {
		return rogue.nc.Request(subject, js(body), time.Second)
	}
	for _, c := range []struct {
		what    string
		subject string
		body    any
	}{
		{"register as the victim", protocol.RegisterSubject(n.ID(), victim.id), victim.req},
		{"end the victim's workload as the victim", protocol.WorkloadEndedSubject(n.ID(), victim.id, wid), protocol.WorkloadStoppedEvent{ID: wid, Namespace: "tenant"}},
		{"renew the victim's workload as the victim", protocol.RenewCredsSubject(n.ID(), victim.id, wid), protocol.RenewCredsRequest{Namespace: "tenant"}},
		{"renew the victim's user", protocol.RenewAgentCredsSubject(n.ID(), victim.id), protocol.RenewAgentCredsRequest{}},
	} {
		if m, err := ask(c.subject, c.body); err == nil {
			t.Errorf("%s: answered %v %q; the rogue's user may not publish there", c.what, m.Header, m.Data)
		}
	}
	if err := rogue.nc.Publish(protocol.AgentHeartbeatSubject(n.ID(), victim.id), js(protocol.AgentHeartbeat{Data: "{}"})); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what, subject, code string
		body                any
	}{
		{"end the victim's workload as itself", protocol.WorkloadEndedSubject(n.ID(), "rogue0", wid), "403", protocol.WorkloadStoppedEvent{ID: wid, Namespace: "tenant"}},
		{"renew the victim's workload as itself", protocol.RenewCredsSubject(n.ID(), "rogue0", wid), "404", protocol.RenewCredsRequest{Namespace: "tenant"}},
	} {
		m, err := ask(c.subject, c.body)
		if err != nil {
			t.Fatalf("%s: %v", c.what, err)
		}
		if code := m.Header.Get(protocol.HeaderErrorCode); code != c.code {
			t.Errorf("%s: code %q (%q), want %s", c.what, code, m.Data, c.code)
		}
	}
	time.Sleep(200 * time.Millisecond) // the forged heartbeat, had it passed, was handled
	if !n.owns(wid) || victim.workloadCount() != 1 {
		t.Errorf("workload %s: owned %v, the victim runs %d", wid, n.owns(wid), victim.workloadCount())
	}
	if after := beat(); !after.Equal(before) {
		t.Errorf("the victim's last heartbeat moved from %v to %v: the rogue's heartbeat counted", before, after)
	}
}

// TestRogueNexletEndsAnothersStart: while the victim starts a workload (slowly), the
// rogue reports that workload ended, under its own agent id (the only one its user may
// use). Before, the node took the end of any deploy in flight from any registered
// nexlet: the deploy then dropped the workload from node state as ended early while the
// victim ran it. Now only the nexlet the deploy went to can end it.
func TestRogueNexletEndsAnothersStart(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	victim := rf.minted("agent0", "native-nexlet", "native", func(a *fakeAgent) { a.startDelay = 1500 * time.Millisecond })
	rogue := rf.minted("rogue0", "rogue", "rogue", nil)
	bids := rf.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	deployed := make(chan *nats.Msg, 1)
	go func() {
		m, err := rf.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), js(startReq("tenant", "w", `{"cmd":"x"}`)), 10*time.Second)
		if err != nil {
			m = &nats.Msg{Data: []byte(err.Error())}
		}
		deployed <- m
	}()
	var wid string
	testkit.Eventually(t, "the victim starting the workload", func() bool {
		victim.mu.Lock()
		defer victim.mu.Unlock()
		for id := range victim.workloads {
			wid = id
		}
		return wid != ""
	})
	m, err := rogue.nc.Request(protocol.WorkloadEndedSubject(n.ID(), rogue.id, wid), js(protocol.WorkloadStoppedEvent{ID: wid, Namespace: "tenant"}), 5*time.Second)
	if err != nil {
		t.Fatalf("the rogue's end report: %v", err)
	}
	t.Logf("the rogue's end report answered %v %s", m.Header, m.Data)
	var started protocol.StartWorkloadResponse
	if m := <-deployed; protocol.Decode(m.Data, &started) != nil || started.ID != wid {
		t.Fatalf("deploy: %s", m.Data)
	}
	time.Sleep(200 * time.Millisecond) // the deploy's end-early handling, had it run
	stored, err := rf.stores[0].ByType(context.Background(), "native")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stored[wid]; !ok || !n.owns(wid) || victim.workloadCount() != 1 {
		t.Errorf("workload %s, which %s runs (%d), left node state on the rogue's word (stored %v, owned %v)", wid, victim.id, victim.workloadCount(), ok, n.owns(wid))
	}
}

// TestRogueNexletStopsWhileOwnerIsGone: the victim's nexlet is gone (it crashed; its
// workload may outlive it, as the native nexlet's do, and its successor takes it back)
// and a rogue asked on the shared subjects confirms the stop of its workload. Before,
// with no nexlet of that owner registered, an answer there was taken: the node dropped
// the workload from node state, so the successor was never handed it. Now a workload is
// spoken for only by a registered nexlet of its owner.
func TestRogueNexletStopsWhileOwnerIsGone(t *testing.T) {
	rf, victim, wid := rogueSetup(t, true)
	n := rf.nodes[0]
	victim.kill()
	n.RemoveAgent(victim.id, "killed by the test")
	rf.rogue.mute.Store(true) // its forgeries alone, not its own "not found" first
	if !rf.stopKept(wid) {
		t.Errorf("workload %s left node state on the rogue's word", wid)
	}
}

// stopKept asks the node to stop workload wid of tenant, fails the test when the
// answer says stopped (only the rogue could have confirmed it), and reports whether
// wid is still in node state.
func (rf *rogueFixture) stopKept(wid string) bool {
	rf.t.Helper()
	m := request(rf.t, rf.client, protocol.UndeploySubject("tenant", wid), protocol.StopWorkloadRequest{Namespace: "tenant"})
	var resp protocol.StopWorkloadResponse
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		rf.t.Fatalf("stop reply %q: %v", m.Data, err)
	}
	if resp.Stopped {
		rf.t.Errorf("stop answered %+v: the rogue's confirmation was taken", resp)
	}
	stored, err := rf.stores[0].ByType(context.Background(), "native")
	if err != nil {
		rf.t.Fatal(err)
	}
	_, ok := stored[wid]
	return ok
}

// TestRogueNexletSquatsAnothersName: supervised rogues, with the credentials their
// node minted for them, register under another supervised nexlet's names while that
// one is down (the name it registered under, as the native nexlet's go_exec, and the
// name nexd supervises it as), then the victim comes back. Before, the rogues got the
// names and the victim's registration was refused (409, the name is live) for as long
// as the rogue lived. Now both names are bound to the victim's agent id for the run:
// the rogues are refused and the victim registers.
func TestRogueNexletSquatsAnothersName(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	asNative := func(a *fakeAgent) { a.req.Name = "go_exec" }
	victim := rf.minted("victim0", "victim", "native", asNative)
	victim.kill()
	n.RemoveAgent(victim.id, "killed by the test")

	squatBeforeReturn(t, rf, []string{"go_exec", "victim"}, victim.id, "victim")
	for _, a := range n.Agents() {
		if a.ID != victim.id && (a.Name == "go_exec" || a.Name == "victim") {
			t.Errorf("%q registered by %s", a.Name, a.ID)
		}
	}
}

// TestRogueNexletSquatsNameAtStart: at nexd's start, before the native nexlet registers,
// another supervised nexlet (a rogue, with its minted user) registers under the native
// nexlet's registration name go_exec, and a third under a name the victim registered
// under in an earlier run (the daemon passes both to ExpectAgent). Both are refused
// (403, reserved), and the victim then registers under go_exec. Before, names were
// reserved only once registered in the run: both rogues registered, and the victim's
// registration was refused (403: go_exec was reserved for the rogue) while they lived.
func TestRogueNexletSquatsNameAtStart(t *testing.T) {
	rf := newRogueFixture(t)
	rf.nodes[0].ExpectAgent("victim0", "native", "go_exec", "wasmtime")
	squatBeforeReturn(t, rf, []string{"go_exec", "wasmtime"}, "victim0", "native")
}

// squatBeforeReturn has rogues (supervised nexlets with their minted users) register
// under names, then the victim (agent id id, supervised as sup) under go_exec: each
// rogue must be refused (403, reserved) and the victim taken.
func squatBeforeReturn(t *testing.T, rf *rogueFixture, names []string, id, sup string) {
	t.Helper()
	var squats []*nats.Msg
	for i, name := range names {
		rogue := rf.expected(fmt.Sprintf("rogue%d", i), fmt.Sprintf("rogue-%d", i), "native")
		rogue.req.Name = name
		m := rogue.register()
		if m.Header.Get(protocol.HeaderErrorCode) == "" {
			t.Cleanup(rogue.kill)
		}
		squats = append(squats, m)
	}
	back := rf.expected(id, sup, "native")
	back.req.Name = "go_exec"
	if m := back.register(); m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Errorf("the victim's registration was refused: %s %s", m.Header.Get(protocol.HeaderErrorCode), m.Data)
	} else {
		t.Cleanup(back.kill)
	}
	for i, m := range squats {
		if m.Header.Get(protocol.HeaderErrorCode) == "" {
			t.Errorf("rogue%d registered under the victim's name %q", i, names[i])
		} else if code, body := errorReply(t, m); code != "403" || !strings.Contains(body.Error, "reserved") {
			t.Errorf("rogue%d answered %s %+v, want 403 naming the reservation", i, code, body)
		}
	}
}

// TestRogueNexletForgesAnothersFeeds: a rogue nexlet that signs (nexd's SDK), with the
// user its node minted, writes into the feeds of the victim's workload: a log line and
// a WORKLOADSTARTED event on $NEX.FEED directly, and through the node's relay under its
// own agent id and under the victim's. None reaches $NEX.FEED (the first is refused by
// the server, the second dropped by the node, the third refused), while the victim's
// own line through the relay does, with its headers. A nexlet that does not sign
// (upstream's SDK) is not told to relay, and its direct line is refused too (without
// allow_nexlet_direct_feeds: TestRogueUpstreamNexletForgesFeeds). Before, the
// rogue's direct line and event reached every subscriber of the tenant's feeds.
func TestRogueNexletForgesAnothersFeeds(t *testing.T) {
	rf, victim, rogue := newSignedRogueFixture(t)
	n := rf.nodes[0]
	plain := rf.minted("plain0", "plain", "plain", nil)
	if !victim.resp.NexdFeedRelay || !rogue.resp.NexdFeedRelay || plain.resp.NexdFeedRelay {
		t.Fatalf("relay said to victim %v, rogue %v, unsigned %v; want true, true, false",
			victim.resp.NexdFeedRelay, rogue.resp.NexdFeedRelay, plain.resp.NexdFeedRelay)
	}
	wid := rf.deployOne("tenant")
	feed := rf.tenantFeed()
	logSubj := protocol.LogSubject("tenant", wid, "stdout")
	started := js(protocol.WorkloadStartedEvent{ID: wid, Namespace: "tenant"})
	pub := func(a *fakeAgent, subj string, data []byte) {
		t.Helper()
		m := nats.NewMsg(subj)
		m.Header.Set("synadia.com-namespace", "tenant")
		m.Data = data
		if err := a.nc.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		_ = a.nc.Flush()
	}
	pub(rogue, logSubj, []byte("forged direct"))
	pub(rogue, protocol.EventSubject("tenant", protocol.EventWorkloadStarted), started)
	pub(rogue, protocol.FeedRelaySubject(n.ID(), rogue.id, logSubj), []byte("forged own relay"))
	pub(rogue, protocol.FeedRelaySubject(n.ID(), rogue.id, protocol.EventSubject("tenant", protocol.EventWorkloadStarted)), started)
	pub(rogue, protocol.FeedRelaySubject(n.ID(), victim.id, logSubj), []byte("forged victim relay"))
	pub(plain, protocol.LogSubject("tenant", "plainwid", "stdout"), []byte("unsigned direct"))
	pub(victim, protocol.FeedRelaySubject(n.ID(), victim.id, logSubj), []byte("honest"))
	var got []string
	for _, m := range feedMsgs(feed) {
		got = append(got, m.Subject+" "+string(m.Data))
		if string(m.Data) == "honest" && m.Header.Get("synadia.com-namespace") != "tenant" {
			t.Errorf("the relayed line lost its headers: %v", m.Header)
		}
	}
	want := []string{logSubj + " honest"} // the unsigned one's too with allow_nexlet_direct_feeds
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("the tenant's feeds carried %q, want only %q", got, want)
	}
}

// newSignedRogueFixture is a rogue fixture with two nexlets that sign their
// registrations (so relay their feeds): a victim of type native and a rogue.
func newSignedRogueFixture(t *testing.T) (rf *rogueFixture, victim, rogue *fakeAgent) {
	t.Helper()
	rf = newRogueFixture(t)
	signed := signedStart(rf.nodes[0], true)
	return rf, rf.minted("agent0", "native-nexlet", "native", signed), rf.minted("rogue0", "rogue", "rogue", signed)
}

// TestRogueNexletForgesEventIDByCase: a rogue nexlet that signs, with a workload of its
// own in the namespace, relays a WORKLOADSTARTED event whose body names another
// nexlet's workload as "id" and its own as "ID" (or as a second "id"). Go's decoder
// folds case and keeps the last, so the relay read its own workload's id; a
// case-sensitive reader of the feed (jq, most languages), or one that keeps the first,
// reads the other's. The relay drops an event with more than one key that folds to
// "id", or one that is not exactly "id". Before, all three were passed on.
func TestRogueNexletForgesEventIDByCase(t *testing.T) {
	rf, _, rogue := newSignedRogueFixture(t)
	n := rf.nodes[0]
	victimWID := rf.deployOne("tenant")
	own := rf.deployOnRogue()
	feed, err := rf.client.SubscribeSync(protocol.EventSubject("tenant", ">"))
	if err != nil {
		t.Fatal(err)
	}
	if err := rf.client.Flush(); err != nil {
		t.Fatal(err)
	}
	subj := protocol.FeedRelaySubject(n.ID(), rogue.id, protocol.EventSubject("tenant", protocol.EventWorkloadStarted))
	for _, body := range []string{
		fmt.Sprintf(`{"id":%q,"ID":%q,"namespace":"tenant"}`, victimWID, own),
		fmt.Sprintf(`{"Id":%q,"namespace":"tenant","x":%q}`, own, victimWID),
		fmt.Sprintf(`{"id":%q,"id":%q,"namespace":"tenant"}`, victimWID, own), // a first-wins reader
		// A reader of a stream of JSON values (jq, a JSON-lines reader) takes the second.
		fmt.Sprintf(`{"id":%q,"namespace":"tenant"} {"id":%q,"namespace":"tenant"}`, own, victimWID),
		fmt.Sprintf(`{"id":%q,"namespace":"tenant"}`+"\n"+`{"id":%q,"namespace":"tenant"}`, own, victimWID),
		fmt.Sprintf(`{"id":%q,"namespace":"tenant","note":"honest"}`, own), // its own: passes
	} {
		if err := rogue.nc.Publish(subj, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	_ = rogue.nc.Flush()
	got := feedBodies(feed)
	want := []string{fmt.Sprintf(`{"id":%q,"namespace":"tenant","note":"honest"}`, own)}
	if !slices.Equal(got, want) {
		t.Errorf("the tenant's events carried %q, want only %q", got, want)
	}
}

// signedStart makes a fake nexlet sign its registration with the key of its supervised
// start, as n has it (SetAgentKey; the adopting nexd has it from the start's record);
// relay: it says it publishes feeds through the node (nexd's SDK since the relay).
func signedStart(n *Node, relay bool) func(*fakeAgent) {
	return func(a *fakeAgent) {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		a.key = kp
		a.req.FeedRelay = relay
		n.SetAgentKey(a.id, pub)
	}
}

// feedCarried publishes a log line of workload wid in namespace tenant on $NEX.FEED
// directly from nc and reports whether a subscriber of the tenant's feeds got it.
func (rf *rogueFixture) feedCarried(nc *nats.Conn, wid, line string) bool {
	rf.t.Helper()
	feed := rf.tenantFeed()
	defer func() { _ = feed.Unsubscribe() }()
	if err := nc.Publish(protocol.LogSubject("tenant", wid, "stdout"), []byte(line)); err != nil {
		rf.t.Fatal(err)
	}
	_ = nc.Flush()
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		m, err := feed.NextMsg(time.Until(deadline))
		if err != nil {
			return false
		}
		if string(m.Data) == line {
			return true
		}
	}
	return false
}

// renewed renews a's nexlet user as nexd's SDK does (a fresh nkey, the request signed
// with a's registration key, from its own user) and connects as the new user.
func (rf *rogueFixture) renewed(a *fakeAgent) *nats.Conn {
	rf.t.Helper()
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	msg := nats.NewMsg(protocol.RenewAgentCredsSubject(a.nodeID, a.id))
	msg.Data = mustJSON(rf.t, protocol.RenewAgentCredsRequest{PublicKey: pub})
	signAt(rf.t, msg, a.key, time.Now())
	m, err := a.nc.RequestMsg(msg, 5*time.Second)
	if err != nil {
		rf.t.Fatal(err)
	}
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
		rf.t.Fatalf("renewal of %s refused: %s %s", a.id, code, m.Data)
	}
	var cd protocol.NatsConnectionData
	if err := protocol.Decode(m.Data, &cd); err != nil {
		rf.t.Fatal(err)
	}
	seed, _ := kp.Seed()
	return testnats.Connect(rf.t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, string(seed)),
		nats.CustomInboxPrefix(cd.InboxPrefix))
}

// TestOlderSupervisedNexletKeepsDirectFeeds: after an upgrade of nexd, the supervised
// native nexlet of the older binary (adopted: signed with its start's key, but its SDK
// predates the relay and says nothing of it) publishes its workloads' feeds on
// $NEX.FEED. With allow_nexlet_direct_feeds they arrive, before and after it renews its
// user (without, TestOlderLocalNexletRefusedDirectFeeds). Before, it was minted
// without the feed grant (at its registration with the new nexd, and at every renewal):
// its lines were refused by the server until it restarted.
func TestOlderSupervisedNexletKeepsDirectFeeds(t *testing.T) {
	rf := newRogueFixture(t, func(o *Options) { o.AllowDirectFeeds = true })
	n := rf.nodes[0]
	old := rf.minted("native0", "native-nexlet", "native", signedStart(n, false))
	if old.resp.NexdFeedRelay {
		t.Error("the older nexlet was told to relay, which its SDK does not know")
	}
	wid := rf.deployOne("tenant")
	if !rf.feedCarried(old.nc, wid, "line before renewal") {
		t.Error("the older nexlet's direct log line did not arrive")
	}
	if !rf.feedCarried(rf.renewed(old), wid, "line after renewal") {
		t.Error("the older nexlet's direct log line did not arrive after it renewed its user")
	}
}

// TestRogueNexletClaimsToBeOlder: a rogue remote nexlet (signed with its key listed in
// remote_nexlets) registers without nexd_feed_relay, as a nexlet older than the relay
// would, to get the direct $NEX.FEED grant back. It is told to relay and its direct
// log line, with the registration's user and with a renewed one, is refused by the
// server: only the supervised nexlet signed with its start's key is taken for older.
func TestRogueNexletClaimsToBeOlder(t *testing.T) {
	rf, rogue := newRemoteFixture(t)
	n := rf.nodes[0]
	rogue.mustRegister()
	waitHealthy(t, n, rogue.id)
	if !rogue.resp.NexdFeedRelay {
		t.Error("the remote nexlet that did not ask to relay was not told to")
	}
	wid := rf.deployOne("tenant")
	if rf.feedCarried(rogue.nc, wid, "forged direct") {
		t.Error("the rogue's direct log line reached the tenant's feed")
	}
	if rf.feedCarried(rf.renewed(rogue), wid, "forged after renewal") {
		t.Error("the rogue's direct log line reached the tenant's feed after it renewed its user")
	}
}

// TestReportedStopReachesFeedOnce: a relaying nexlet's WORKLOADSTOPPED reaches the
// namespace's feed exactly once, whether the relayed event or the ended report (retried
// until a node acknowledges it) reaches the node first, or only the report does: the
// event the nexlet relays while no nexd runs goes nowhere. Before, a job that ended
// while nexd was down was never heard of on the feed (e2e TestLiveRestore). The report
// publishes only its own workload's event.
func TestReportedStopReachesFeedOnce(t *testing.T) {
	rf, victim, _ := newSignedRogueFixture(t)
	n := rf.nodes[0]
	down, relayed, forged := rf.deployOne("tenant"), rf.deployOne("tenant"), rf.deployOne("tenant")
	feed, err := rf.client.SubscribeSync(protocol.EventSubject("tenant", protocol.EventWorkloadStopped))
	if err != nil {
		t.Fatal(err)
	}
	if err := rf.client.Flush(); err != nil {
		t.Fatal(err)
	}
	stopped := func(id string) []byte {
		return js(protocol.WorkloadStoppedEvent{ID: id, Namespace: "tenant", WorkloadType: "native", Metadata: map[string]string{"exit_code": "7"}})
	}
	report := func(id string, body []byte) {
		t.Helper()
		m := request(t, victim.nc, protocol.WorkloadEndedSubject(n.ID(), victim.id, id), body)
		if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
			t.Fatalf("ended report for %s refused: %s %s", id, code, m.Header.Get(protocol.HeaderError))
		}
	}
	// Only the report: its relayed event went out while no node listened. Then a retry
	// (its acknowledgement lost).
	report(down, stopped(down))
	report(down, stopped(down))
	// Relayed first, then reported.
	if err := victim.nc.Publish(protocol.FeedRelaySubject(n.ID(), victim.id, protocol.EventSubject("tenant", protocol.EventWorkloadStopped)), stopped(relayed)); err != nil {
		t.Fatal(err)
	}
	_ = victim.nc.Flush()
	testkit.EventuallyWithin(t, 10*time.Second, "the relayed stop passed", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		_, ok := n.feeds.stops[relayed]
		return ok
	})
	report(relayed, stopped(relayed))
	// Its own workload's report, another's event in the body.
	report(forged, stopped("another"))
	got := feedBodies(feed)
	want := []string{string(stopped(down)), string(stopped(relayed))}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("the tenant's WORKLOADSTOPPED feed carried %q, want each once: %q", got, want)
	}
}

// feedBodies is what sub received within 2 s: the messages' bodies.
func feedBodies(sub *nats.Subscription) []string {
	var got []string
	for _, m := range feedMsgs(sub) {
		got = append(got, string(m.Data))
	}
	return got
}

// feedMsgs is what sub gets within 2 s.
func feedMsgs(sub *nats.Subscription) []*nats.Msg {
	var got []*nats.Msg
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		got = append(got, m)
	}
	return got
}

// TestRogueNexletSquatsRemoteName: a supervised nexlet (a rogue, with its minted user)
// registers under the name listed for a remote nexlet in remote_nexlets while that one
// is not connected, then under its own name again; and one whose kept names (a record
// of an earlier run, passed to ExpectAgent) hold that name. The remote nexlet then
// registers with its listed key and is taken; the rogue's registration under its name
// is refused (403). Before, a supervised nexlet's registration bound the name to it
// for the run (and the daemon kept it for every later run), and the remote nexlet was
// refused (403 reserved for supervised nexlet) although listed for it.
func TestRogueNexletSquatsRemoteName(t *testing.T) {
	for _, kept := range []bool{false, true} {
		t.Run(fmt.Sprintf("kept=%v", kept), func(t *testing.T) {
			rf, remote := newRemoteFixture(t)
			n := rf.nodes[0]
			if kept {
				n.ExpectAgent("rogue0", "rogue", "remote")
			} else {
				rogue := rf.expected("rogue0", "rogue", "native")
				rogue.req.Name = "remote"
				if m := rogue.register(); m.Header.Get(protocol.HeaderErrorCode) == "" {
					t.Cleanup(rogue.kill)
					t.Error("the supervised rogue registered under the remote nexlet's name")
				} else if code, body := errorReply(t, m); code != "403" {
					t.Errorf("the rogue's squat answered %s %+v, want 403", code, body)
				}
				rogue.req.Name = "rogue"
				if m := rogue.register(); m.Header.Get(protocol.HeaderErrorCode) != "" {
					t.Fatalf("the rogue's registration under its own name: %s", m.Data)
				}
				t.Cleanup(rogue.kill)
			}
			if m := remote.register(); m.Header.Get(protocol.HeaderErrorCode) != "" {
				t.Fatalf("the listed remote nexlet was refused its name: %s %s", m.Header.Get(protocol.HeaderErrorCode), m.Data)
			}
			t.Cleanup(remote.kill)
		})
	}
}

// newRemoteFixture is a rogue fixture whose node lists one remote nexlet, "remote" of
// type native, and that nexlet (agent id remote0) on its registration user, signing
// with its listed key, not registered yet.
func newRemoteFixture(t *testing.T) (*rogueFixture, *fakeAgent) {
	t.Helper()
	key, _ := nkeys.CreateUser()
	pub, _ := key.PublicKey()
	rf := newRogueFixture(t, func(o *Options) {
		o.AllowRemoteRegistration = true
		o.RemoteNexlets = []RemoteNexlet{{Name: "remote", Type: "native", PublicKey: pub}}
	})
	n := rf.nodes[0]
	rc, err := rf.m.MintRegister("remote0", n.ID())
	if err != nil {
		t.Fatal(err)
	}
	remote := newFakeAgentOn(t, rf.dial(rc), n.ID(), "remote0", "remote", "native")
	remote.reconnect, remote.key = rf.dial, key
	return rf, remote
}

// TestRelayedEventTypeIsAToken: a rogue nexlet that signs relays events about its own
// workload under the types ">" and "*": the node republished them as
// $NEX.FEED.tenant.events.> and .* (the server takes a published subject with
// wildcard tokens), subjects no event has, under the node's own user. Now only an
// event type of letters, digits, - and _ passes.
func TestRelayedEventTypeIsAToken(t *testing.T) {
	rf, _, rogue := newSignedRogueFixture(t)
	n := rf.nodes[0]
	own := rf.deployOnRogue()
	feed := rf.tenantFeed()
	body := []byte(fmt.Sprintf(`{"id":%q,"namespace":"tenant"}`, own))
	for _, typ := range []string{">", "*", protocol.EventWorkloadStarted} {
		if err := rogue.nc.Publish(protocol.FeedRelaySubject(n.ID(), rogue.id, protocol.EventSubject("tenant", typ)), body); err != nil {
			t.Fatal(err)
		}
	}
	_ = rogue.nc.Flush()
	var got []string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); {
		m, err := feed.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		got = append(got, m.Subject)
	}
	if want := []string{protocol.EventSubject("tenant", protocol.EventWorkloadStarted)}; !slices.Equal(got, want) {
		t.Errorf("the tenant's feed carried %q, want only %q", got, want)
	}
}

// deployOnRogue deploys a workload in namespace tenant on the nexlet of type rogue (a
// rogue that runs a workload of its own) and returns its id.
func (rf *rogueFixture) deployOnRogue() string {
	rf.t.Helper()
	bids := rf.auction("tenant", protocol.AuctionRequest{AgentType: "rogue"}, 1)
	if len(bids) != 1 {
		rf.t.Fatal("no bid from the rogue")
	}
	req := startReq("tenant", "r", `{"cmd":"x"}`)
	req.WorkloadType = "rogue"
	var own protocol.StartWorkloadResponse
	if m := request(rf.t, rf.client, protocol.DeploySubject("tenant", bids[0].BidderID), req); protocol.Decode(m.Data, &own) != nil || own.ID == "" {
		rf.t.Fatalf("deploy on the rogue: %q", m.Data)
	}
	return own.ID
}
