package node

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAuctionDropLabelsCannotBeImitated: a client auctions in the "namespaces" "*" and
// "?" (nats-server delivers a publish to $NEX.SVC.*.control.AUCTION, wildcard token and
// all, to the node's subscription) while the node's queue is held, more than a
// namespace's queue holds. Before, the node queued them like any namespace's, bid in
// them, and counted their overflow under the labels that stand for the namespaces past
// the first 256 and for nats.go's blind drops (36 each). No valid namespace is "*" or
// "?" (nor can deploy in one), so now the node refuses such auctions at intake,
// counted under AuctionDropsInvalid, and the two labels count only what they say.
func TestAuctionDropLabelsCannotBeImitated(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	f := newFixtureOn(t, srv, 1, nil)
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "native", "native", nil)
	body, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "x", Tags: map[string]string{}})
	pc := testnats.Connect(t, srv)

	// Does the node bid in namespace "*"?
	if m, err := pc.Request(protocol.AuctionSubject("*"), body, time.Second); err == nil {
		t.Errorf("the node answered an auction in namespace \"*\": %q", m.Data)
	}

	const each = 100
	n.auctions.mu.Lock() // the workers are off the CPU: the queue fills
	for _, ns := range []string{AuctionDropsOther, AuctionDropsUnsorted} {
		for range each {
			if err := pc.PublishRequest(protocol.AuctionSubject(ns), "_INBOX.x.y", body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := pc.Flush(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if m, _, _ := n.auctionSub.Pending(); m >= 2*each-1 {
			break
		}
	}
	n.auctions.mu.Unlock()
	want := map[string]uint64{AuctionDropsInvalid: 2*each + 1}
	var drops map[string]uint64
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if drops = n.AuctionDrops(); drops[AuctionDropsInvalid] == want[AuctionDropsInvalid] {
			break
		}
	}
	t.Logf("drops by label: %v", drops)
	if len(drops) != 1 || drops[AuctionDropsInvalid] != want[AuctionDropsInvalid] {
		t.Errorf("drops %v, want %v", drops, want)
	}
}
