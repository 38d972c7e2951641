package node

import (
	"fmt"
	"testing"
	"time"
)

// TestBidBookBounds: a flood in one namespace evicts its own oldest bids and never
// grows the book beyond its bounds; another namespace's fresh bid survives it.
func TestBidBookBounds(t *testing.T) {
	bk := newBidBook(100, 1000)
	exp := time.Now().Add(time.Minute)
	bk.add("honest", bid{agentID: "a", ns: "tenant", expires: exp})
	for i := range 100_000 {
		bk.add(fmt.Sprint("flood", i), bid{agentID: "a", ns: "flood", expires: exp})
		if len(bk.bids) > 1000 || bk.byNS["flood"] > 100 || len(bk.order) > 2*len(bk.bids)+64 {
			t.Fatalf("after %d: %d bids, %d in flood, order %d", i, len(bk.bids), bk.byNS["flood"], len(bk.order))
		}
	}
	if _, ok := bk.take("honest"); !ok {
		t.Fatal("the honest bid was evicted by another namespace's flood")
	}
	if _, ok := bk.take("flood99999"); !ok {
		t.Fatal("the newest flood bid is gone")
	}
	if _, ok := bk.take("flood0"); ok {
		t.Fatal("the oldest flood bid survived")
	}
	// Many namespaces: the total bound holds, oldest first.
	for i := range 5000 {
		bk.add(fmt.Sprint("ns", i), bid{agentID: "a", ns: fmt.Sprint("ns", i), expires: exp})
	}
	if len(bk.bids) != 1000 {
		t.Fatalf("%d bids, want the total bound 1000", len(bk.bids))
	}
	if _, ok := bk.bids["ns4999"]; !ok {
		t.Fatal("the newest bid was evicted")
	}
	bk.sweep(exp.Add(time.Second))
	if len(bk.bids) != 0 || len(bk.byNS) != 0 {
		t.Fatalf("after expiry: %d bids, %v", len(bk.bids), bk.byNS)
	}
}
