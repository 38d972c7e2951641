package node

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// TestLongNamespaceRefused: a workload deployed in a namespace longer than
// protocol.MaxNamespaceLen got credentials it could not connect with (its JWT, about
// 16 bytes a namespace character, overran nats-server's default 4 KiB control line):
// the deploy answered "started", the workload then failed with "maximum control line
// exceeded". Now the node does not bid in such a namespace and refuses the deploy with
// a 400 naming the namespace and the bound, before the nexlet is asked; a namespace of
// exactly the bound deploys and its workload connects to the operator-mode server.
func TestLongNamespaceRefused(t *testing.T) {
	rf := newRogueFixture(t)
	a := rf.minted("AGENTLONGNS", "native", "native", nil)
	n := rf.nodes[0]

	atBound := strings.Repeat("n", protocol.MaxNamespaceLen)
	wid := deployAs(t, rf.client, atBound, "at-bound")
	a.mu.Lock()
	cd := a.creds[wid]
	a.mu.Unlock()
	if err := connectAs(rf, cd); err != nil {
		t.Fatalf("workload of a %d-character namespace (JWT %d bytes) cannot connect: %v", len(atBound), len(cd.NatsUserJWT), err)
	}

	long := strings.Repeat("L", 256)
	// What the refusal spares the workload: its user, as the node would mint it.
	if lcd, err := rf.m.MintWorkload(long, "WLONG"); err == nil {
		if err := connectAs(rf, lcd); err == nil {
			t.Fatalf("a %d-character namespace's workload connects: the bound has no reason", len(long))
		} else if !strings.Contains(strings.ToLower(err.Error()), "maximum control line") {
			t.Fatalf("a %d-character namespace's workload fails with %v, want the control line", len(long), err)
		}
	}

	invalid := n.AuctionDrops()[AuctionDropsInvalid]
	if bids := rf.auction(long, protocol.AuctionRequest{AgentType: "native"}, 0); len(bids) != 0 {
		t.Fatalf("%d bids in a %d-character namespace, want none", len(bids), len(long))
	}
	if got := n.AuctionDrops()[AuctionDropsInvalid]; got != invalid+1 {
		t.Fatalf("refused auctions %d, want %d", got, invalid+1)
	}

	// A bid from a valid namespace, spent on a deploy into the long one (the node's
	// own check, not the auction's, must refuse it).
	bids := rf.auction("short", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("%d bids in namespace short", len(bids))
	}
	a.mu.Lock()
	starts := a.starts
	a.mu.Unlock()
	m := request(t, rf.client, protocol.DeploySubject(long, bids[0].BidderID), startReq(long, "too-long", `{"cmd":"x"}`))
	if code, desc := m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError); code != "400" ||
		m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
		t.Fatalf("deploy into a %d-character namespace: code %q %q body %q, want 400 not started", len(long), code, desc, m.Data)
	}
	for _, want := range []string{`field \"namespace\"`, "256 characters long, more than 64", "control line"} {
		if !strings.Contains(string(m.Data), want) {
			t.Fatalf("refusal %s does not say %q", m.Data, want)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.starts != starts {
		t.Fatalf("the nexlet was asked to start %d workload(s) in the long namespace", a.starts-starts)
	}
}

// connectAs connects once as a workload holding cd would (the SDK's name and inbox
// prefix), without testnats.Connect's t.Fatal: the failure is what is tested.
func connectAs(rf *rogueFixture, cd protocol.NatsConnectionData) error {
	nc, err := nats.Connect(rf.op.Server.ClientURL(), nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.Name(cd.ConnName), nats.CustomInboxPrefix(cd.InboxPrefix))
	if err != nil {
		return err
	}
	nc.Close()
	return nil
}
