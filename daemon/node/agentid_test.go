package node

import (
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestRemoteNexletTakesAnothersAgentID: on an open bus (a plain nats-server, no users
// minted, so any client may register under any agent id) two remote nexlets are listed,
// "wasm" and "evil", each with its own key. wasm registers as remote-a and serves.
// evil, signing with its own listed key, registers under remote-a: before, the node
// checked the key against the list, not the id, took it, and dropped wasm's
// registration: the node bid no more for wasm workloads while wasm ran on. evil's
// registration under FEED (the feed relay's word: a start for it goes out on the relay's
// subject) was taken too. Now both are refused (409, 400), wasm keeps its id and its
// bids; wasm registering again under its own key while it lives is taken at once; and
// once wasm is gone (offline), its id is free.
func TestRemoteNexletTakesAnothersAgentID(t *testing.T) {
	wasmKey, _ := nkeys.CreateUser()
	wasmPub, _ := wasmKey.PublicKey()
	evilKey, _ := nkeys.CreateUser()
	evilPub, _ := evilKey.PublicKey()
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.AllowRemoteRegistration = true
		o.RemoteNexlets = []RemoteNexlet{
			{Name: "wasm", Type: "wasm", PublicKey: wasmPub},
			{Name: "evil", Type: "evil", PublicKey: evilPub},
		}
		o.OfflineAfter = 2 * time.Second
		o.DegradedAfter = time.Second
	})
	n := f.nodes[0]
	wasm := newFakeAgent(t, f.srv, n.ID(), "remote-a", "wasm", "wasm")
	wasm.key = wasmKey
	wasm.mustRegister()
	waitHealthy(t, n, "remote-a")
	holder := func() string {
		n.mu.Lock()
		defer n.mu.Unlock()
		if r := n.agents["remote-a"]; r != nil {
			return r.owner
		}
		return ""
	}
	wasmBids := func() int {
		return len(f.auction("tenant", protocol.AuctionRequest{AgentType: "wasm", Lifecycle: protocol.LifecycleService}, 1))
	}

	feed := newFakeAgent(t, f.srv, n.ID(), "FEED", "evil", "evil")
	feed.key = evilKey
	if m := feed.register(); m.Header.Get(protocol.HeaderErrorCode) != "400" {
		t.Errorf("evil's registration under agent id FEED answered %q %s, want 400", m.Header.Get(protocol.HeaderErrorCode), m.Data)
	}
	n.mu.Lock()
	_, took := n.agents["FEED"]
	n.mu.Unlock()
	if took {
		t.Error("agent id FEED is registered")
		feed.kill()
		n.RemoveAgent("FEED", "test: its name is evil's") // for the next attack
	}

	evil := newFakeAgent(t, f.srv, n.ID(), "remote-a", "evil", "evil")
	evil.key = evilKey
	if m := evil.register(); m.Header.Get(protocol.HeaderErrorCode) != "409" {
		t.Errorf("evil's registration under wasm's live agent id answered %q %s, want 409", m.Header.Get(protocol.HeaderErrorCode), m.Data)
	}
	if h := holder(); h != "remote:wasm" {
		t.Errorf("agent id remote-a is held by %q after evil's registration, want remote:wasm", h)
	}
	if b := wasmBids(); b != 1 {
		t.Errorf("the node bid %d times for a wasm workload after evil's registration under wasm's id, want 1", b)
	}

	// wasm restarting under its own key registers again at once, while its old
	// registration is live.
	again := newFakeAgent(t, f.srv, n.ID(), "remote-a", "wasm", "wasm")
	again.key = wasmKey
	wasm.kill()
	again.mustRegister()
	waitHealthy(t, n, "remote-a")
	if b := wasmBids(); b != 1 {
		t.Errorf("the node bid %d times for a wasm workload after wasm registered again, want 1", b)
	}

	// Gone (offline), its id may be taken.
	again.kill()
	testkit.Eventually(t, "remote-a offline", func() bool {
		for _, ai := range n.Agents() {
			if ai.ID == "remote-a" {
				return ai.Health == protocol.HealthOffline
			}
		}
		return true
	})
	late := newFakeAgent(t, f.srv, n.ID(), "remote-a", "evil", "evil")
	late.key = evilKey
	late.mustRegister()
	t.Cleanup(late.kill)
	if h := holder(); h != "remote:evil" {
		t.Errorf("agent id remote-a is held by %q once wasm was offline, want remote:evil", h)
	}
}

// TestRemoteNexletRestartsUnderANewID: with minted users (operator-mode server) a
// remote nexlet gets a new agent id from RREGISTER at each start. Restarted (its old
// process gone, its old registration not yet offline), it registers under the new id,
// signed with its listed key: before, the node refused it (409, its name taken by the
// live old registration) until that went offline, 30 s by default, while its
// workloads waited. Now it is taken at once, replaces the old registration and gets
// its workload back (a listed name goes with one key only: authorize).
func TestRemoteNexletRestartsUnderANewID(t *testing.T) {
	rf, remote := newRemoteFixture(t)
	n := rf.nodes[0]
	remote.mustRegister()
	waitHealthy(t, n, remote.id)
	wid := rf.deployOne("tenant")
	remote.kill()

	rc, err := rf.m.MintRegister("remote1", n.ID())
	if err != nil {
		t.Fatal(err)
	}
	again := newFakeAgentOn(t, rf.dial(rc), n.ID(), "remote1", "remote", "native")
	again.reconnect, again.key = rf.dial, remote.key
	m := again.register()
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
		t.Fatalf("the restarted remote nexlet under its new id, signed with its listed key: %s %s", code, m.Data)
	}
	t.Cleanup(again.kill)
	if _, ok := again.resp.ExistingState[wid]; !ok {
		t.Errorf("the restarted remote nexlet did not get its workload %s back: %v", wid, again.resp.ExistingState)
	}
	n.mu.Lock()
	_, old := n.agents[remote.id]
	n.mu.Unlock()
	if old {
		t.Errorf("the old registration %s is still there", remote.id)
	}
}
