package node

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
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

	long := strings.Repeat("L", 400) // 364 connected (TestWorkloadNamespaceBound)
	// What the refusal spares the workload: its user, as the node would mint it.
	if lcd, err := rf.m.MintWorkload(long, "WLONG"); err == nil {
		// The server's reason for closing, not the client's error: that can be only the
		// reset of the closed connection (testnats.RefusedForControlLine).
		refused, err := testnats.RefusedForControlLine(t, rf.op.Server, func() error { return connectAs(rf, lcd) })
		if err == nil {
			t.Fatalf("a %d-character namespace's workload connects: the bound has no reason", len(long))
		} else if !refused {
			t.Fatalf("a %d-character namespace's workload fails with %v, not closed by the server for the control line", len(long), err)
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
	wantRefusedUnstarted(t, a, starts, m, `field \"namespace\"`, "400 characters long, more than 64", "control line")
}

// wantRefusedUnstarted checks that m refuses a deploy (400, not started) saying each of
// wants, and that nexlet a was asked no start since it had received starts.
func wantRefusedUnstarted(t *testing.T, a *fakeAgent, starts int, m *nats.Msg, wants ...string) {
	t.Helper()
	if code, desc := m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError); code != "400" ||
		m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
		t.Fatalf("deploy: code %q %q body %q, want 400 not started", code, desc, m.Data)
	}
	for _, want := range wants {
		if !strings.Contains(string(m.Data), want) {
			t.Fatalf("refusal %s does not say %q", m.Data, want)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.starts != starts {
		t.Fatalf("the nexlet was asked to start %d workload(s) the node refused", a.starts-starts)
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

// TestLongDomainNamespaceRefused: protocol.MaxNamespaceLen keeps a workload's artifact
// reader's JWT within nats-server's default control line only for a JetStream domain
// short enough (each artifact grant names the domain; the workload's own user has none
// since TestAttackWorkloadJetStreamAnswersGoAnywhere, so the test's domain grew from
// 64 to 200 characters). With a 64-character
// nats.jsdomain, a deploy into a 64-character namespace answered "started" and its
// workload's user then could not connect ("maximum control line exceeded"), the failure
// the namespace bound was to prevent. Now the node does not bid in such a namespace
// (TestLongDomainNodeDoesNotBid), and a deploy into it on a bid from the system
// namespace (whose deploys may name any namespace) is refused with a 400 naming the
// size and the control line, before the nexlet is asked; a shorter namespace on the
// same node deploys and its workload connects.
func TestLongDomainNamespaceRefused(t *testing.T) {
	rf := newRogueFixtureMinting(t, mint.Options{JSDomain: strings.Repeat("d", 200)})
	a := rf.minted("AGENTLONGDOM", "native", "native", nil)

	wid := deployAs(t, rf.client, "short", "fits")
	a.mu.Lock()
	cd := a.creds[wid]
	a.mu.Unlock()
	if err := connectAs(rf, cd); err != nil {
		t.Fatalf("workload of namespace short (JWT %d bytes) cannot connect: %v", len(cd.NatsUserJWT), err)
	}

	ns := strings.Repeat("n", protocol.MaxNamespaceLen)
	if bids := rf.auction(ns, protocol.AuctionRequest{AgentType: "native"}, 0); len(bids) != 0 {
		t.Fatalf("%d bids in a %d-character namespace whose workloads' credentials would not fit", len(bids), len(ns))
	}
	testkit.Eventually(t, "the auction counted as not bid on for credentials", func() bool { return rf.nodes[0].NotBid()["credentials"] == 1 })
	bids := rf.auction(protocol.SystemNamespace, protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("%d bids in the system namespace", len(bids))
	}
	a.mu.Lock()
	starts := a.starts
	a.mu.Unlock()
	m := request(t, rf.client, protocol.DeploySubject(protocol.SystemNamespace, bids[0].BidderID), startReq(ns, "too-large", `{"cmd":"nats://`+ns+`/x"}`))
	if m.Header.Get(protocol.HeaderErrorCode) == "" {
		var started protocol.StartWorkloadResponse
		_ = protocol.Decode(m.Data, &started)
		a.mu.Lock()
		cd := a.creds[started.ID]
		a.mu.Unlock()
		t.Fatalf("deploy into a %d-character namespace with a 200-character JetStream domain answered started (%q); its workload connects: %v",
			len(ns), m.Data, connectAs(rf, cd))
	}
	wantRefusedUnstarted(t, a, starts, m, "credentials", "control line", "nats.jsdomain")
}

// TestLongDomainNodeDoesNotBid: of two nodes on one server, one with a 64-character
// nats.jsdomain, an auction in a 64-character namespace got both bids, and the client
// picking the long-domain node's was refused at deploy (400, the credentials' size).
// Now that node does not bid there (counted as reason "credentials", in its INFO too):
// the auction gets only the other node's bid, the deploy lands on it, and its workload
// connects. In a short namespace both still bid.
func TestLongDomainNodeDoesNotBid(t *testing.T) {
	rf := newRogueFixtureMinting(t, mint.Options{JSDomain: strings.Repeat("d", 200)})
	longNode := rf.nodes[0]
	longAgent := rf.minted("AGENTLONGDOM", "native", "native", nil)
	node, _, m := startMintingNode(t, rf.op, mint.Options{JSDomain: "hub"}, "node-1")
	agent := rf.mintedOn(node, m, "AGENTHUB", "native", "native", nil)

	if bids := rf.auction("short", protocol.AuctionRequest{AgentType: "native"}, 2); len(bids) != 2 {
		t.Fatalf("%d bids in namespace short, want both nodes'", len(bids))
	}
	ns := strings.Repeat("n", protocol.MaxNamespaceLen)
	bids := rf.auction(ns, protocol.AuctionRequest{AgentType: "native", AuctionID: "long"}, 1)
	if len(bids) != 1 || bids[0].NodeID != node.ID() {
		t.Fatalf("bids in a %d-character namespace: %+v, want only node-1's (%s)", len(ns), bids, node.ID())
	}
	testkit.Eventually(t, "the long-domain node's auction counted as not bid on for credentials", func() bool { return longNode.NotBid()["credentials"] == 1 })
	if got := node.NotBid()["credentials"]; got != 0 {
		t.Fatalf("node-1 (domain hub) counts %d auctions not bid on for credentials", got)
	}
	msg := request(t, rf.client, protocol.DeploySubject(ns, bids[0].BidderID), startReq(ns, "lands", `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(msg.Data, &started); err != nil || msg.Header.Get(protocol.HeaderErrorCode) != "" || started.ID == "" {
		t.Fatalf("deploy: %s %q %v", msg.Header.Get(protocol.HeaderErrorCode), msg.Data, err)
	}
	agent.mu.Lock()
	cd, ok := agent.creds[started.ID]
	agent.mu.Unlock()
	if !ok {
		t.Fatalf("workload %s is not on node-1's nexlet", started.ID)
	}
	if err := connectAs(rf, cd); err != nil {
		t.Fatalf("its workload (credentials %d bytes) cannot connect: %v", protocol.WorkloadCredentialsSize(cd), err)
	}
	longAgent.mu.Lock()
	defer longAgent.mu.Unlock()
	if len(longAgent.creds) != 0 {
		t.Fatalf("the long-domain node's nexlet was asked to start %d workload(s)", len(longAgent.creds))
	}

	var info protocol.NodeInfoResponse
	if err := protocol.Decode(request(t, rf.client, protocol.InfoSubject(longNode.ID()), struct{}{}).Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.AuctionsNotBid["credentials"] != 1 {
		t.Fatalf("INFO nexd_auctions_not_bid = %v, want credentials 1", info.AuctionsNotBid)
	}
}

// TestLongNamespaceWorkloadKeptAfterUpgrade (upgrade fault): node state holds a
// service an older nexd deployed in a 100-character namespace (its workload connected:
// up to 145 did without a JetStream domain). The bound refuses new deploys there only:
// the nexlet's registration gets it back to replay with credentials it connects with,
// and its renewal is answered with credentials that connect too.
func TestLongNamespaceWorkloadKeptAfterUpgrade(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	long := strings.Repeat("L", 100)
	req := startReq(long, "old", `{"cmd":"x"}`)
	if err := rf.stores[0].Put(t.Context(), "native", "WOLDLONGNS", req); err != nil {
		t.Fatal(err)
	}
	a := rf.minted("AGENTOLDNS", "native", "native", nil)
	w, ok := a.resp.ExistingState["WOLDLONGNS"]
	if !ok {
		t.Fatalf("the stored workload of a %d-character namespace was not handed back to replay", len(long))
	}
	if err := connectAs(rf, w.WorkloadCreds); err != nil {
		t.Fatalf("its replayed credentials do not connect: %v", err)
	}
	m := request(t, a.nc, protocol.RenewCredsSubject(n.ID(), a.id, "WOLDLONGNS"), protocol.RenewCredsRequest{Namespace: long})
	var renewed protocol.NatsConnectionData
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" || protocol.Decode(m.Data, &renewed) != nil {
		t.Fatalf("renewal: %s %q", code, m.Data)
	}
	if err := connectAs(rf, renewed); err != nil {
		t.Fatalf("its renewed credentials do not connect: %v", err)
	}
	if !rf.stored("native", "WOLDLONGNS") {
		t.Fatal("the workload left node state")
	}
}
