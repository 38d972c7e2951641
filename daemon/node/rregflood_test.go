package node

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackRemoteRegisterFloodBounded: a rogue remote nexlet, with the user its
// operator gave remote nexlets to ask RREGISTER for an agent id (nothing more: the
// operator's bootstrap user), asks again and again. Each answer is a fresh agent id
// and a registration user minted for it, which the minter remembers so that the
// nexlet's registration can revoke it. Before, it remembered every one for good: the
// flood's 3,000 asks left 3,000 agent ids in nexd's memory (about 170 bytes each ask),
// a leak without end. Now the agent ids that hold registration users only are bounded
// (the oldest forgotten: their users expire within 5 minutes, mint.DefaultRegisterTTL),
// and a listed remote nexlet still gets its id and registers after the flood.
func TestAttackRemoteRegisterFloodBounded(t *testing.T) {
	rf, remote := newRemoteFixture(t)
	n := rf.nodes[0]
	var p jwt.Permissions
	p.Pub.Allow.Add(protocol.RemoteRegisterSubject(n.o.Nexus))
	p.Sub.Allow.Add("_INBOX_bootstrap.>")
	tok, seed := rf.op.UserWith(t, "remote-bootstrap", nil, p)
	boot := testnats.Connect(t, rf.op.Server, nats.UserJWTAndSeed(tok, seed), nats.CustomInboxPrefix("_INBOX_bootstrap"))

	before := rf.m.AgentsRemembered()
	var answered, assigned atomic.Int64
	inbox := boot.NewRespInbox()
	sub, err := boot.Subscribe(inbox, func(m *nats.Msg) {
		var resp protocol.RegisterRemoteAgentResponse
		if protocol.Decode(m.Data, &resp) == nil && resp.AssignedAgentID != "" {
			assigned.Add(1)
		}
		answered.Add(1)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	const asks = 3_000
	body := mustJSON(t, protocol.RegisterRemoteAgentRequest{})
	for i := range asks {
		if err := boot.PublishRequest(protocol.RemoteRegisterSubject(n.o.Nexus), inbox, body); err != nil {
			t.Fatal(err)
		}
		if i%500 == 499 {
			if err := boot.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	deadline := time.Now().Add(2 * time.Minute)
	for answered.Load() < asks && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := answered.Load(); got < asks {
		t.Fatalf("the node answered %d of %d RREGISTER asks within 2 minutes", got, asks)
	}
	grew := rf.m.AgentsRemembered() - before
	t.Logf("%d asks, %d agent ids assigned: the minter remembers %d more agent ids", asks, assigned.Load(), grew)
	if assigned.Load() != asks {
		t.Errorf("%d of %d asks assigned an agent id", assigned.Load(), asks)
	}
	if grew > mint.MaxPendingRegistrations {
		t.Errorf("the minter remembers %d more agent ids after %d RREGISTER asks, want at most %d", grew, asks, mint.MaxPendingRegistrations)
	}

	// The listed remote nexlet asks for its id and registers under it.
	m, err := boot.Request(protocol.RemoteRegisterSubject(n.o.Nexus), body, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var resp protocol.RegisterRemoteAgentResponse
	if err := protocol.Decode(m.Data, &resp); err != nil || resp.RegistrationCreds == nil {
		t.Fatalf("the listed remote nexlet's RREGISTER after the flood: %q, %v", m.Data, err)
	}
	again := newFakeAgentOn(t, rf.dial(*resp.RegistrationCreds), n.ID(), resp.AssignedAgentID, "remote", "native")
	again.reconnect, again.key = rf.dial, remote.key
	if m := again.register(); m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("the listed remote nexlet's registration under its new id after the flood: %s %s", m.Header.Get(protocol.HeaderErrorCode), m.Data)
	}
	t.Cleanup(again.kill)
	waitHealthy(t, n, again.id)
}
