package node

import (
	"sync"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/protocol"
)

// Default bounds on pending bids. A bid costs about 200 bytes (its id twice, its agent
// id and bookkeeping), so the defaults bound them to about 2 MB.
const (
	DefaultMaxBids             = 10_000
	DefaultMaxBidsPerNamespace = 1_000
	// AuctionPendingMsgs and AuctionPendingBytes bound what the AUCTION subscription
	// queues: a flood beyond them is dropped by the client library (slow consumer on
	// that subscription only), never queued without bound or charged to other
	// subscriptions.
	AuctionPendingMsgs  = 4096
	AuctionPendingBytes = 4 << 20
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
)

// auctionQueue takes auctions off the subscription at once (no JSON, no signature) and
// serves the namespaces round robin: a namespace flooding auctions overflows its own
// queue and loses its own messages, while another namespace's auction waits at most one
// turn per waiting namespace. Anyone may publish auctions, so nothing here grows
// without bound.
type auctionQueue struct {
	mu      sync.Mutex
	queues  map[string][]micro.Request
	ring    []string // namespaces with queued auctions, in turn order
	bytes   int      // queued bodies
	wake    chan struct{}
	dropped uint64
}

func newAuctionQueue() *auctionQueue {
	return &auctionQueue{queues: map[string][]micro.Request{}, wake: make(chan struct{}, 1)}
}

// push queues r for ns; false when ns's queue (or the namespace table) is full.
func (q *auctionQueue) push(ns string, r micro.Request) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	cur, waiting := q.queues[ns]
	size := len(r.Data())
	if len(cur) >= auctionQueuePerNS || (!waiting && len(q.queues) >= auctionQueueMaxNS) ||
		size > auctionMaxBytes || q.bytes+size > auctionQueueMaxBytes {
		q.dropped++
		return false
	}
	if !waiting {
		q.ring = append(q.ring, ns)
	}
	q.queues[ns] = append(cur, r)
	q.bytes += size
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// pop takes the next auction, one namespace at a time.
func (q *auctionQueue) pop() (micro.Request, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.ring) == 0 {
		return nil, false
	}
	ns := q.ring[0]
	q.ring = q.ring[1:]
	list := q.queues[ns]
	r := list[0]
	list[0] = nil
	q.bytes -= len(r.Data())
	if list = list[1:]; len(list) == 0 {
		delete(q.queues, ns)
	} else {
		q.queues[ns] = list
		q.ring = append(q.ring, ns) // its next turn comes after the others
	}
	return r, true
}

// enqueueAuction is the AUCTION endpoint's handler: it only queues a detached copy.
func (n *Node) enqueueAuction(r micro.Request) {
	d := &detachedRequest{nc: n.o.NC, subject: r.Subject(), reply: r.Reply(), data: r.Data(), headers: r.Headers(),
		steps: steps.Start(n.log)}
	if !n.auctions.push(protocol.NamespaceOf(r.Subject()), d) {
		n.log.Debug("auction dropped: its namespace's queue is full", "subject", r.Subject())
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
			r, ok := n.auctions.pop()
			if !ok {
				break
			}
			n.handleAuction(r)
			if n.ctx.Err() != nil {
				return
			}
		}
	}
}
