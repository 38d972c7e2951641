package node

import (
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAuctionQueueMakesRoomForANewNamespace: a flood spread over 2,000 namespaces
// fills the queue, pushing a hundred auctions for each one a worker takes; a tenant
// then queues one auction. It must get in, never be the one dropped to make room, and
// be taken within one turn per namespace waiting when it came that had lost no
// auction (the flood's all had); the queue stays within its bounds throughout. Before,
// past 1,024 waiting namespaces a new one's auctions were all dropped.
func TestAuctionQueueMakesRoomForANewNamespace(t *testing.T) {
	for _, tc := range []struct {
		name string
		nss  int
		body int
	}{
		{"small auctions", 2000, 60},
		{"large bodies", 2000, 60 << 10},
		{"one namespace each", auctionQueueMax - 1, 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := newAuctionQueue()
			body := []byte(strings.Repeat("x", tc.body))
			msgs := make([]*nats.Msg, tc.nss)
			for i := range msgs {
				msgs[i] = &nats.Msg{Subject: protocol.AuctionSubject(fmt.Sprintf("flood%d", i)), Reply: "_INBOX.x", Data: body}
			}
			i := 0
			flood := func(k int) {
				for range k {
					m := msgs[i%len(msgs)]
					q.push(auctionNamespace(m.Subject), queuedAuction{m: m})
					i++
					if r := len(q.ring[0]) + len(q.ring[1]); q.n > auctionQueueMax || q.bytes > auctionQueueMaxBytes || r > 2*len(q.queues)+65 {
						t.Fatalf("queue past its bounds: %d auctions, %d bytes, rings %d for %d namespaces", q.n, q.bytes, len(q.ring[0])+len(q.ring[1]), len(q.queues))
					}
				}
			}
			flood(64 * tc.nss)
			honest := &nats.Msg{Subject: protocol.AuctionSubject("tenant"), Reply: "_INBOX.abcdefghijklmnopqrstuv.1",
				Data: []byte(`{"agent_type":"native","auction_id":"honest","tags":{}}`)}
			waiting, ahead := len(q.queues), 0
			for _, v := range q.queues {
				if !v.lost {
					ahead++
				}
			}
			if !q.push("tenant", queuedAuction{m: honest}) {
				t.Fatal("the tenant's auction was refused")
			}
			for turn := 1; ; turn++ {
				flood(100)
				if q.queues["tenant"] == nil { // its drop is counted under "*"
					t.Fatalf("the tenant's auction was dropped at turn %d", turn)
				}
				a, ok := q.pop()
				if !ok {
					t.Fatal("queue empty")
				}
				if a.m == honest {
					t.Logf("%d namespaces waiting (%d had lost none), %d auctions, %d bytes; the tenant's auction taken at turn %d", waiting, ahead, q.n, q.bytes, turn)
					break
				}
				if turn > ahead+1 {
					t.Fatalf("the tenant's auction not taken in %d turns, %d namespaces waiting when it came, %d of them had lost none", turn, waiting, ahead)
				}
			}
		})
	}
}

// TestAuctionQueueRefusesLargeHeaders (attack): an auction whose body is small but
// whose headers are large. Only bodies were bounded (64 KiB), and nats-server bounds
// body and headers only together, by max_payload, which an operator may raise past the
// queue's 8 MiB: one 9 MiB auction made the queue drop every other namespace's auction
// to make room and then held more than its bound. Now body and headers together are
// bounded as the body was: both such auctions are refused, counted against their
// namespace, and the tenant's auction stays queued.
func TestAuctionQueueRefusesLargeHeaders(t *testing.T) {
	q := newAuctionQueue()
	honest := &nats.Msg{Subject: protocol.AuctionSubject("tenant"), Reply: "_INBOX.abcdefghijklmnopqrstuv.1",
		Data: []byte(`{"agent_type":"native","auction_id":"honest","tags":{}}`)}
	if !q.push("tenant", queuedAuction{m: honest}) {
		t.Fatal("the tenant's auction was refused")
	}
	for _, size := range []int{auctionMaxBytes + 1, auctionQueueMaxBytes + 1<<20} {
		m := &nats.Msg{Subject: protocol.AuctionSubject("flood"), Reply: "_INBOX.x", Data: []byte(`{}`),
			Header: nats.Header{"X-Pad": {strings.Repeat("h", size)}}}
		if q.push("flood", queuedAuction{m: m}) {
			t.Errorf("an auction with %d bytes of headers was queued", size)
		}
		if q.bytes > auctionQueueMaxBytes {
			t.Errorf("after an auction with %d bytes of headers the queue holds %d bytes, more than %d", size, q.bytes, auctionQueueMaxBytes)
		}
		if q.queues["tenant"] == nil {
			t.Fatalf("an auction with %d bytes of headers had the tenant's auction dropped", size)
		}
	}
	if d := q.Drops(); d["flood"] != 2 || d["tenant"] != 0 {
		t.Errorf("drops %v, want 2 of flood and none of tenant", d)
	}
}

// TestAuctionQueueHeaderMemory (attack): auctions carrying headers, as nats.go delivers
// them over a real connection, fill the queue; what the heap holds for them must stay
// near the queue's 8 MiB bound. Headers were charged once, by their bytes: nats.go
// holds each twice (the payload it copied, and the string the parsed map slices) and a
// key costs a map entry besides, so 3,000 one-letter headers an auction held 38 MiB
// for 8 MiB charged (4.8 times), one 60 KB header 18 MiB (2.2 times).
func TestAuctionQueueHeaderMemory(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	pc := testnats.Connect(t, srv)
	ch := make(chan *nats.Msg, 64)
	sub, err := nc.ChanSubscribe(protocol.AuctionSubject("*"), ch)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	many := nats.Header{}
	for i := 0; len(many) < 400; i++ {
		many[fmt.Sprintf("k%d", i)] = []string{"v"}
	}
	for _, c := range []struct {
		name string
		h    nats.Header
	}{
		{"many small headers", many},
		{"one large header", nats.Header{"X-Pad": {strings.Repeat("h", 30000)}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			q := newAuctionQueue()
			var ms runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&ms)
			before := ms.HeapAlloc
			queued := 0
			for i := range 1000 {
				ns := fmt.Sprintf("ns%d", i)
				if err := pc.PublishMsg(&nats.Msg{Subject: protocol.AuctionSubject(ns), Reply: "_INBOX.x", Data: []byte(`{}`), Header: c.h}); err != nil {
					t.Fatal(err)
				}
				if q.push(ns, queuedAuction{m: <-ch}) {
					queued++
				}
			}
			runtime.GC()
			runtime.ReadMemStats(&ms)
			grew := int64(ms.HeapAlloc) - int64(before)
			t.Logf("%d auctions queued (of 1000), %d held, charged %d KiB; heap grew %d KiB", queued, q.n, q.bytes>>10, grew>>10)
			if q.n == 0 {
				t.Fatal("nothing queued: the attack did not fill the queue")
			}
			// A quarter for the allocator's size classes (a 30 KB header is held in two
			// 32 KiB blocks), 2 MiB for what the heap counts besides (the connections'
			// buffers): 9 MiB measured with the fix.
			if limit := int64(auctionQueueMaxBytes)*5/4 + 2<<20; grew > limit {
				t.Errorf("the queue holds %d KiB of the heap for auctions charged %d KiB; want at most %d KiB", grew>>10, q.bytes>>10, limit>>10)
			}
			runtime.KeepAlive(q)
		})
	}
}
