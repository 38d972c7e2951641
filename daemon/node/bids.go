package node

import (
	"context"
	"log/slog"
	"maps"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/internal/steps"
)

// Default bounds on pending bids. A bid costs about 200 bytes (its id twice, its agent
// id and bookkeeping), so the defaults bound them to about 2 MB.
const (
	DefaultMaxBids             = 10_000
	DefaultMaxBidsPerNamespace = 1_000
	// AuctionPendingMsgs and AuctionPendingBytes bound nats.go's list in front of the
	// AUCTION callback. The callback keeps that list near empty (it is several times
	// cheaper than the reader filling it), so the list only rides out the moments the
	// callback is off the CPU; beyond it nats.go drops, blind to namespace (counted as
	// AuctionDropsUnsorted). nats.go's byte bound counts bodies, not subject and reply,
	// so the message bound is what bounds memory: a message with both at the server's
	// 4 KiB control line costs about 4.5 KiB, 36 MiB for 8,192 (TestAuctionPendingMemory;
	// 65,536 held 273 MiB). Under load on a 2-core host 8,192 is too few to ride out
	// every stall (a quarter of a flood dropped blind at load 15), which nexctl's
	// asking again covers.
	AuctionPendingMsgs  = 8 << 10
	AuctionPendingBytes = 8 << 20
)

type bid struct {
	agentID string
	ns      string
	expires time.Time
}

// bidBook holds the bids a node made and may still be deployed to, bounded per
// namespace and in total; the oldest bid goes first when a bound is reached, so a
// client flooding auctions evicts its own bids (and at worst old ones), while a fresh
// honest bid stays deployable for its TTL unless the flood outpaces the total bound.
type bidBook struct {
	perNS, total int
	bids         map[string]bid
	order        []string // creation order; ids no longer in bids are skipped
	byNS         map[string]int
	evicted      uint64
}

func newBidBook(perNS, total int) *bidBook {
	if total <= 0 {
		total = DefaultMaxBids
	}
	if perNS <= 0 {
		perNS = DefaultMaxBidsPerNamespace
	}
	return &bidBook{perNS: min(perNS, total), total: total, bids: map[string]bid{}, byNS: map[string]int{}}
}

func (bk *bidBook) add(id string, b bid) {
	if bk.byNS[b.ns] >= bk.perNS {
		for _, old := range bk.order {
			if ob, ok := bk.bids[old]; ok && ob.ns == b.ns {
				bk.remove(old)
				bk.evicted++
				break
			}
		}
	}
	for len(bk.bids) >= bk.total && len(bk.order) > 0 {
		old := bk.order[0]
		bk.order = bk.order[1:]
		if _, ok := bk.bids[old]; ok {
			bk.remove(old)
			bk.evicted++
		}
	}
	bk.bids[id] = b
	bk.byNS[b.ns]++
	bk.order = append(bk.order, id)
	bk.compact()
}

func (bk *bidBook) remove(id string) {
	b, ok := bk.bids[id]
	if !ok {
		return
	}
	delete(bk.bids, id)
	if bk.byNS[b.ns]--; bk.byNS[b.ns] <= 0 {
		delete(bk.byNS, b.ns)
	}
}

// take removes and returns a bid: a bidder id deploys at most once.
func (bk *bidBook) take(id string) (bid, bool) {
	b, ok := bk.bids[id]
	if ok {
		bk.remove(id)
	}
	return b, ok
}

// sweep forgets expired bids.
func (bk *bidBook) sweep(now time.Time) {
	for id, b := range bk.bids {
		if now.After(b.expires) {
			bk.remove(id)
		}
	}
	bk.compact()
}

// compact drops skipped ids from order once they are most of it, so order stays
// within twice the live bids.
func (bk *bidBook) compact() {
	if len(bk.order) <= 2*len(bk.bids)+64 {
		return
	}
	live := bk.order[:0]
	for _, id := range bk.order {
		if _, ok := bk.bids[id]; ok {
			live = append(live, id)
		}
	}
	clear(bk.order[len(live):])
	bk.order = live
}

// Bounds of the auction queue: per namespace, and how many namespaces may wait at once.
const (
	auctionQueuePerNS = 64
	auctionQueueMaxNS = 1024
	auctionWorkers    = 2
	// auctionMaxBytes refuses an auction body no honest client sends (a request is a
	// few hundred bytes); auctionQueueMaxBytes bounds all queued bodies together.
	auctionMaxBytes      = 64 << 10
	auctionQueueMaxBytes = 8 << 20
	// auctionDropNamespaces bounds the namespaces whose drops are counted by name; the
	// drops of any further namespace are counted under AuctionDropsOther.
	auctionDropNamespaces = 256
)

// AuctionDropsOther counts the drops of the namespaces past the first 256 that
// dropped, AuctionDropsUnsorted those of any namespace nats.go dropped before the node
// saw them: neither is a valid namespace, so neither names a real one.
const (
	AuctionDropsOther    = "*"
	AuctionDropsUnsorted = "?"
)

// queuedAuction is an auction as the subscription delivered it.
type queuedAuction struct {
	m  *nats.Msg
	st *steps.Timer // from its arrival (debug logging only)
}

// auctionQueue takes auctions off the subscription at once (no JSON, no signature) and
// serves the namespaces round robin: a namespace flooding auctions overflows its own
// queue and loses its own messages, while another namespace's auction waits at most one
// turn per waiting namespace. Anyone may publish auctions, so nothing here grows
// without bound.
type auctionQueue struct {
	mu     sync.Mutex
	queues map[string][]queuedAuction
	ring   []string // namespaces with queued auctions, in turn order
	bytes  int      // queued bodies
	wake   chan struct{}
	// drops counts the auctions dropped by namespace (at most auctionDropNamespaces
	// names, then AuctionDropsOther); warned is what the last warning had reported.
	drops, warned map[string]uint64
	warnedBlind   uint64 // nats.go's drops the last warning reported (health loop only)
}

func newAuctionQueue() *auctionQueue {
	return &auctionQueue{queues: map[string][]queuedAuction{}, wake: make(chan struct{}, 1),
		drops: map[string]uint64{}, warned: map[string]uint64{}}
}

// push queues a for ns; false (and counted against ns) when ns's queue, the namespace
// table or the byte bound is full.
func (q *auctionQueue) push(ns string, a queuedAuction) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	cur, waiting := q.queues[ns]
	size := len(a.m.Data)
	if len(cur) >= auctionQueuePerNS || (!waiting && len(q.queues) >= auctionQueueMaxNS) ||
		size > auctionMaxBytes || q.bytes+size > auctionQueueMaxBytes {
		if _, known := q.drops[ns]; !known && len(q.drops) >= auctionDropNamespaces {
			ns = AuctionDropsOther
		}
		q.drops[ns]++
		return false
	}
	if !waiting {
		q.ring = append(q.ring, ns)
	}
	q.queues[ns] = append(cur, a)
	q.bytes += size
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// pop takes the next auction, one namespace at a time.
func (q *auctionQueue) pop() (queuedAuction, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.ring) == 0 {
		return queuedAuction{}, false
	}
	ns := q.ring[0]
	q.ring = q.ring[1:]
	list := q.queues[ns]
	a := list[0]
	list[0] = queuedAuction{}
	q.bytes -= len(a.m.Data)
	if list = list[1:]; len(list) == 0 {
		delete(q.queues, ns)
	} else {
		q.queues[ns] = list
		q.ring = append(q.ring, ns) // its next turn comes after the others
	}
	return a, true
}

// Drops returns the auctions dropped so far, by namespace.
func (q *auctionQueue) Drops() map[string]uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return maps.Clone(q.drops)
}

// newDrops returns the namespaces that dropped auctions since the last call, with how
// many, and marks them reported.
func (q *auctionQueue) newDrops() map[string]uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out map[string]uint64
	for ns, d := range q.drops {
		if d != q.warned[ns] {
			if out == nil {
				out = map[string]uint64{}
			}
			out[ns] = d - q.warned[ns]
			q.warned[ns] = d
		}
	}
	return out
}

// onAuction is the AUCTION subscription's callback. It runs on the subscription's one
// delivery goroutine, behind nats.go's pending list, which drops whatever arrives
// while it is full, of any namespace: so it does no more than split the namespace out
// of the subject and queue the message, several times faster than nats.go's reader
// fills that list (BenchmarkAuctionIntake), and the drops fall in the flooding
// namespace's own queue.
func (n *Node) onAuction(m *nats.Msg) {
	if m.Reply != "" && !isInbox(m.Reply) {
		if n.log.Enabled(context.Background(), slog.LevelDebug) {
			n.log.Debug("request dropped: its reply subject is not an inbox", "subject", m.Subject, "reply", m.Reply)
		}
		return
	}
	n.auctions.push(auctionNamespace(m.Subject), queuedAuction{m: m, st: steps.Start(n.log)})
}

// auctionNamespace is the namespace token of $NEX.SVC.<namespace>.control.AUCTION,
// without protocol.NamespaceOf's split (an allocation per flooded message).
func auctionNamespace(subject string) string {
	rest := subject
	for range 2 {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			return ""
		}
		rest = rest[i+1:]
	}
	if i := strings.IndexByte(rest, '.'); i >= 0 {
		return rest[:i]
	}
	return rest
}

// warnAuctionDrops logs, once a health tick, each namespace whose auctions were
// dropped since the last tick (at most a line a namespace a tick however fast the
// flood), and the auctions nats.go dropped unsorted, if any.
func (n *Node) warnAuctionDrops() {
	for ns, d := range n.auctions.newDrops() {
		n.log.Warn("auctions dropped: the namespace sends more than the node can answer; other namespaces' auctions are still served",
			"namespace", ns, "dropped", d)
	}
	n.mu.Lock()
	sub := n.auctionSub
	n.mu.Unlock()
	if sub == nil {
		return
	}
	if blind, err := sub.Dropped(); err == nil && uint64(blind) != n.auctions.warnedBlind {
		n.log.Warn("auctions dropped before the node could sort them by namespace: it could not take them off its connection fast enough",
			"dropped", uint64(blind)-n.auctions.warnedBlind)
		n.auctions.warnedBlind = uint64(blind)
	}
}

// auctionWorker answers queued auctions until the node stops.
func (n *Node) auctionWorker() {
	defer n.loops.Done()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-n.auctions.wake:
		}
		for {
			a, ok := n.auctions.pop()
			if !ok {
				break
			}
			n.handleAuction(&detachedRequest{nc: n.o.NC, subject: a.m.Subject, reply: a.m.Reply, data: a.m.Data,
				headers: micro.Headers(a.m.Header), steps: a.st})
			if n.ctx.Err() != nil {
				return
			}
			// Let the subscription's goroutine in: under a flood both workers are busy,
			// and each turn it waits for a processor lets nats.go's reader queue
			// thousands of auctions it drops blind once its list is full.
			runtime.Gosched()
		}
	}
}
