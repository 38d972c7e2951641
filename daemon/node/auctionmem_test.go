package node

import (
	"encoding/json"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAuctionPendingMemory: one tenant's auctions with a ~3.9 KB inbox reply (within
// the server's 4 KiB control line) while the AUCTION callback is off the CPU (held
// here by n.auctions.mu): nats.go's pending bytes count neither subject nor reply, so
// only the message bound holds them. With 65,536 (c31a123): heap +273 MiB (the
// review's measure); with 8,192 it stays within 64 MiB.
func TestAuctionPendingMemory(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	f := newFixtureOn(t, srv, 1, nil)
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "native", "native", nil)
	body, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "x", Tags: map[string]string{}})
	reply := "_INBOX." + strings.Repeat("r", 3900)
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	before := ms.HeapAlloc
	n.auctions.mu.Lock() // the callback is off the CPU
	pc := testnats.Connect(t, srv)
	for range 70000 {
		if err := pc.PublishRequest(protocol.AuctionSubject("tenant"), reply, body); err != nil {
			t.Fatal(err)
		}
	}
	_ = pc.Flush()
	// Until nats.go has read every auction (queued, dropped, or the one the callback
	// holds): before that, the in-process server's buffer for the node's connection
	// holds the rest, and the heap counted it (78 MiB once under make test's load).
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		m, _, _ := n.auctionSub.Pending()
		d, _ := n.auctionSub.Dropped()
		if m >= AuctionPendingMsgs-1 && m+d >= 70000-1 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	m, b, _ := n.auctionSub.Pending()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	grew := (int64(ms.HeapAlloc) - int64(before)) >> 20
	t.Logf("pending %d msgs %d bytes counted; heap grew %d MiB", m, b, grew)
	n.auctions.mu.Unlock()
	if grew > 64 {
		t.Errorf("auction intake holds %d MiB for one tenant's auctions; want at most 64", grew)
	}
}
