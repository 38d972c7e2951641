package node

import (
	"errors"
	"maps"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestNotBidCountedByReason: each auction the node refuses, on a real NATS server,
// moves the counter of its reason and no other (NotBid, nexd_auctions_not_bid_total),
// an auction it bids on moves none, and the node's INFO answer carries the counts
// (nexd_auctions_not_bid, which nexctl node info shows). Before, the reasons were only
// debug log lines.
func TestNotBidCountedByReason(t *testing.T) {
	var storeDown atomic.Bool
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Tags = map[string]string{"zone": "a"}
		o.CanBid = func() error {
			if storeDown.Load() {
				return errors.New("state bucket has no leader")
			}
			return nil
		}
	})
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", func(a *fakeAgent) { a.req.MaxWorkloads = 1 })
	want := n.NotBid()
	for r, c := range want {
		if c != 0 {
			t.Fatalf("a new node counts %d auctions not bid on for %s", c, r)
		}
	}
	if len(want) != int(noBidReasons)+3 {
		t.Fatalf("NotBid lists %d reasons, want every one: %v", len(want), want)
	}
	refused := func(reason string) {
		t.Helper()
		want[reason]++
		testkit.Eventually(t, "auction counted as not bid on for "+reason, func() bool { return maps.Equal(n.NotBid(), want) })
	}
	none := func(req protocol.AuctionRequest, reason string) {
		t.Helper()
		if bids := f.auction("tenant", req, 0); len(bids) != 0 {
			t.Fatalf("%s: the node bid: %+v", reason, bids)
		}
		refused(reason)
	}

	none(protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "b"}}, "tags")
	none(protocol.AuctionRequest{AgentType: "wasm"}, "no_nexlet")
	none(protocol.AuctionRequest{AgentType: "native", Lifecycle: protocol.LifecycleFunction}, "lifecycle")
	collect(t, f.client, protocol.AuctionSubject("tenant"), []byte(`{"auction_id": 7`), 1, 10*time.Second, 0)
	refused("bad_request")
	collect(t, f.client, protocol.AuctionSubject(strings.Repeat("n", protocol.MaxNamespaceLen+1)),
		mustJSON(t, protocol.AuctionRequest{AuctionID: "a", AgentType: "native", Tags: map[string]string{}}), 0, time.Second, 0)
	refused("namespace")
	// Too large (attack): refused by the queue, and not "dropped", which tells the
	// operator the node could not keep up (before, it was counted so).
	collect(t, f.client, protocol.AuctionSubject("tenant"),
		mustJSON(t, protocol.AuctionRequest{AuctionID: strings.Repeat("a", auctionMaxBytes), AgentType: "native", Tags: map[string]string{}}), 0, time.Second, 0)
	refused("too_large")
	storeDown.Store(true)
	none(protocol.AuctionRequest{AgentType: "native"}, "state_store")
	storeDown.Store(false)

	// A bid moves nothing; then the nexlet is full.
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("no bid for an auction the node can take: %+v", bids)
	}
	if got := n.NotBid(); !maps.Equal(got, want) {
		t.Fatalf("a bid moved the counters: %v, want %v", got, want)
	}
	if m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "w1", `{"cmd":"x"}`)); m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("deploy: %s", m.Data)
	}
	none(protocol.AuctionRequest{AgentType: "native"}, "max_workloads")

	if _, err := n.EnterLameduck(time.Hour); err != nil {
		t.Fatal(err)
	}
	none(protocol.AuctionRequest{AgentType: "native"}, "draining")

	var info protocol.NodeInfoResponse
	if err := protocol.Decode(request(t, f.client, protocol.InfoSubject(n.ID()), struct{}{}).Data, &info); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(info.AuctionsNotBid, want) {
		t.Fatalf("INFO nexd_auctions_not_bid = %v, want %v", info.AuctionsNotBid, want)
	}
}

// TestTagsMatchWithoutMap: the auction path's tag match (no map built) answers as
// protocol.TagsMatch against the node's whole tag map, for user tags, every built-in,
// and in and out of lame duck (user tags may not use the built-ins' nex. prefix).
func TestTagsMatchWithoutMap(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Tags = map[string]string{"zone": "a", "empty": ""}
	})
	n := f.nodes[0]
	var wants []map[string]string
	add := func(w map[string]string) { wants = append(wants, w) }
	add(nil)
	add(map[string]string{})
	add(map[string]string{"zone": "a"})
	add(map[string]string{"zone": "b"})
	add(map[string]string{"empty": ""})
	add(map[string]string{"missing": ""})
	add(map[string]string{protocol.TagOS: "plan9"})
	for k, v := range n.Tags() {
		add(map[string]string{k: v})
		add(map[string]string{k: v + "x", "zone": "a"})
		add(map[string]string{k: v, "zone": "a"})
	}
	check := func() {
		t.Helper()
		n.mu.Lock()
		defer n.mu.Unlock()
		have := n.tagsLocked()
		for _, w := range wants {
			if got, want := n.tagsMatchLocked(w), protocol.TagsMatch(w, have); got != want {
				t.Errorf("tags %v against %v: %v, want %v", w, have, got, want)
			}
		}
	}
	check()
	if _, err := n.EnterLameduck(time.Hour); err != nil {
		t.Fatal(err)
	}
	add(map[string]string{protocol.TagLameduck: "true"})
	add(map[string]string{protocol.TagLameduck: "false"})
	check()
}
