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
	"github.com/nexd-project/nexd/protocol"
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

// Bounds of the auction queue: per namespace and in all (auctions, and bytes).
const (
	auctionQueuePerNS = 64
	// auctionQueueMax bounds the queued auctions, so also how many namespaces wait at
	// once: a flood must spread over as many namespaces at once, each holding a single
	// auction, before a newcomer's auction can be the one dropped to make room.
	auctionQueueMax = 8 << 10
	auctionWorkers  = 2
	// auctionMaxBytes refuses an auction body and headers no honest client sends (a
	// request is a few hundred bytes); auctionQueueMaxBytes bounds what the queued auctions hold
	// together, subject, reply and headers included (auctionCost).
	auctionMaxBytes      = 64 << 10
	auctionQueueMaxBytes = 8 << 20
	// auctionEntryBytes is what a queued auction holds besides its subject, reply, body
	// and headers (its nats.Msg, its slot in its namespace's queue, a share of the
	// namespace's own): charged so that a flood of empty auctions is bounded in bytes.
	auctionEntryBytes = 256
	// auctionDropNamespaces bounds the namespaces whose drops are counted by name; the
	// drops of any further namespace are counted under AuctionDropsOther.
	auctionDropNamespaces = 256
)

// AuctionDropsOther counts the drops of the namespaces past the first 256 that
// dropped, AuctionDropsUnsorted those of any namespace nats.go dropped before the node
// saw them, AuctionDropsInvalid the auctions refused at intake because their subject's
// namespace token is no valid namespace (protocol.IsNamespace: a publish to a literal
// "*" reaches the node's wildcard subscription; a namespace too long for its
// workloads' credentials gets no bid, as it would get no deploy). None is a valid namespace, and only
// valid ones are counted by name, so none names a real one or can be imitated.
const (
	AuctionDropsOther    = "*"
	AuctionDropsUnsorted = "?"
	AuctionDropsInvalid  = "!"
)

// queuedAuction is an auction as the subscription delivered it.
type queuedAuction struct {
	m    *nats.Msg
	st   *steps.Timer // from its arrival (debug logging only)
	cost int          // auctionCost, as charged to the queue
	// at, atLost: the queue's served and servedLost when it was queued.
	at, atLost uint64
}

// auctionCost is what a queued auction holds: nats.go copies subject, reply and the
// payload (headers too) out of its read buffer for each message.
func auctionCost(m *nats.Msg) int {
	c := auctionEntryBytes + len(m.Subject) + len(m.Reply) + len(m.Data)
	// A header is held twice: its line in the payload nats.go copied (Data is a slice of
	// it past the headers) and in the string the map's keys and values slice; each key
	// is a map entry and a []string besides (before, headers were counted once and
	// without that: 3,000 one-letter headers an auction held 4.8 times what they were
	// charged, TestAuctionQueueHeaderMemory).
	for k, vs := range m.Header {
		c += 2*len(k) + auctionHeaderKeyBytes
		for _, v := range vs {
			c += 2*(len(v)+len(": \r\n")) + 16
		}
	}
	return c
}

// auctionHeaderKeyBytes is what a header key holds besides its bytes: its map entry
// (its share of a bucket, the key's string and the values' slice header) and its
// []string's array (measured: about 80 bytes a key).
const auctionHeaderKeyBytes = 96

// auctionUnit is the grain in which the queue weighs what a namespace holds: an
// auction as clients send it is one unit, a larger one weighs by its bytes.
const auctionUnit = 1 << 10

// nsQueue is one namespace's queued auctions, oldest first (list[head:]).
type nsQueue struct {
	ns         string
	list       []queuedAuction
	head       int
	units      int      // sum of its auctions' units: its bucket
	prev, next *nsQueue // in its bucket
	gone       bool     // emptied: skipped where it is still in a ring
	// lost: it lost an auction (its own queue full, or to make room) since it began
	// waiting, so it takes its turns after those that did not.
	lost bool
}

func (v *nsQueue) len() int { return len(v.list) - v.head }

// bucket is the namespaces holding the same units, in the order they came to hold them.
type bucket struct{ first, last *nsQueue }

// auctionQueue takes auctions off the subscription at once (no JSON, no signature) and
// serves the namespaces round robin: a namespace flooding auctions overflows its own
// queue and loses its own messages, while another namespace's auction waits at most one
// turn per waiting namespace. Anyone may publish auctions, in any namespaces, so the
// queue is bounded in auctions and bytes, and when full it makes room by dropping the
// oldest auction of the namespace holding the most (in units): no set of namespaces
// keeps a new one out, and a namespace with one auction waiting loses it only once
// every waiting namespace holds no more (auctionQueueMax namespaces at once). The
// namespaces that lost an auction since they began waiting take their turns after
// the others: a flood spread over many namespaces loses auctions in all of them, so a
// newcomer waits for the flood's namespaces that did not, not for all of them.
// Namespaces sit in buckets by units, so finding the one holding the most costs O(1)
// amortised (the pointer to the fullest bucket falls at most as far as pushes raised it).
type auctionQueue struct {
	mu      sync.Mutex
	queues  map[string]*nsQueue
	buckets []bucket // by units held
	top     int      // the fullest non-empty bucket, when any auction is queued
	// ring holds the namespaces with queued auctions in turn order, those that lost
	// none first ([0]) and those that lost some ([1]); gone ones are skipped.
	ring  [2][]*nsQueue
	gone  int // gone namespaces still in a ring
	n     int // queued auctions
	bytes int // their auctionCost
	wake  chan struct{}
	// drops counts the auctions dropped by namespace (at most auctionDropNamespaces
	// names, then AuctionDropsOther); warned is what the last warning had reported.
	drops, warned map[string]uint64
	warnedBlind   uint64 // nats.go's drops the last warning reported (health loop only)
	// tooLarge counts those of the drops refused for their size (auctionMaxBytes): no
	// honest client sends them, so they are not the node failing to keep up.
	tooLarge uint64
	// served counts the auctions popped, servedLost those of them whose namespace had
	// lost one: an auction's wait is counted in the turns taken between its push and
	// its pop, in all and by such namespaces, counts no machine's pace changes.
	served, servedLost uint64
	// popped, when set (tests), is called under the lock with each auction popped: its
	// namespace and its wait in turns, in all and behind namespaces that had lost one.
	popped func(ns string, turns, lostTurns uint64)
}

func newAuctionQueue() *auctionQueue {
	return &auctionQueue{queues: map[string]*nsQueue{}, wake: make(chan struct{}, 1),
		drops: map[string]uint64{}, warned: map[string]uint64{}}
}

func auctionUnits(cost int) int { return (cost + auctionUnit - 1) / auctionUnit }

// dropLocked counts a dropped auction against ns.
func (q *auctionQueue) dropLocked(ns string) {
	if _, known := q.drops[ns]; !known && len(q.drops) >= auctionDropNamespaces {
		ns = AuctionDropsOther
	}
	q.drops[ns]++
}

func (q *auctionQueue) unlinkLocked(v *nsQueue) {
	b := &q.buckets[v.units]
	if v.prev != nil {
		v.prev.next = v.next
	} else {
		b.first = v.next
	}
	if v.next != nil {
		v.next.prev = v.prev
	} else {
		b.last = v.prev
	}
	v.prev, v.next = nil, nil
}

func (q *auctionQueue) linkLocked(v *nsQueue) {
	for len(q.buckets) <= v.units {
		q.buckets = append(q.buckets, bucket{})
	}
	b := &q.buckets[v.units]
	v.prev = b.last
	if b.last != nil {
		b.last.next = v
	} else {
		b.first = v
	}
	b.last = v
	q.top = max(q.top, v.units)
}

// push queues a for ns; false (and counted against ns) when ns's queue is full or the
// body too large. When the queue is full in all, the oldest auctions of the namespaces
// holding the most are dropped (and counted against them) to make room.
func (q *auctionQueue) push(ns string, a queuedAuction) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	cur := q.queues[ns]
	full := cur != nil && cur.len() >= auctionQueuePerNS
	if !full {
		a.cost = auctionCost(a.m)
	}
	// Body and headers: nats-server bounds them only together, by max_payload, which
	// an operator may set past the whole queue's bound.
	if full || a.cost-auctionEntryBytes-len(a.m.Subject)-len(a.m.Reply) > auctionMaxBytes {
		if cur != nil {
			cur.lost = true
		}
		if !full {
			q.tooLarge++
		}
		q.dropLocked(ns)
		return false
	}
	for q.n > 0 && (q.n >= auctionQueueMax || q.bytes+a.cost > auctionQueueMaxBytes) {
		q.evictLocked(cur)
	}
	if cur == nil || cur.gone { // gone: evicting emptied it
		cur = &nsQueue{ns: ns}
		q.queues[ns] = cur
		q.ring[0] = append(q.ring[0], cur)
	} else {
		q.unlinkLocked(cur)
	}
	if len(cur.list) == cap(cur.list) && cur.head > 0 {
		k := copy(cur.list, cur.list[cur.head:])
		clear(cur.list[k:])
		cur.list, cur.head = cur.list[:k], 0
	}
	a.at, a.atLost = q.served, q.servedLost
	cur.list = append(cur.list, a)
	cur.units += auctionUnits(a.cost)
	q.linkLocked(cur)
	q.n++
	q.bytes += a.cost
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// evictLocked drops the oldest auction of the namespace holding the most: pusher's
// own when it holds as much as any (so a flood of namespaces that each hold one
// auction churns itself), else that of the one that came to hold the most first.
func (q *auctionQueue) evictLocked(pusher *nsQueue) {
	for q.buckets[q.top].first == nil {
		q.top--
	}
	v := q.buckets[q.top].first
	if pusher != nil && !pusher.gone && pusher.units >= q.top {
		v = pusher
	}
	q.takeLocked(v)
	v.lost = true
	q.dropLocked(v.ns)
	if v.gone {
		q.gone++
		q.compactLocked()
	}
}

// takeLocked removes v's oldest auction; v is gone from the queue once empty (its
// place in a ring is then skipped).
func (q *auctionQueue) takeLocked(v *nsQueue) queuedAuction {
	a := v.list[v.head]
	v.list[v.head] = queuedAuction{}
	v.head++
	q.n--
	q.bytes -= a.cost
	q.unlinkLocked(v)
	v.units -= auctionUnits(a.cost)
	if v.len() == 0 {
		delete(q.queues, v.ns)
		v.gone = true
	} else {
		q.linkLocked(v)
	}
	return a
}

// compactLocked drops gone namespaces from the rings once they are most of them, so
// the rings stay within twice the waiting namespaces.
func (q *auctionQueue) compactLocked() {
	if q.gone <= len(q.queues)+64 {
		return
	}
	for i, r := range q.ring {
		live := r[:0]
		for _, v := range r {
			if !v.gone {
				live = append(live, v)
			}
		}
		clear(r[len(live):])
		q.ring[i] = live
	}
	q.gone = 0
}

// pop takes the next auction, one namespace at a time.
func (q *auctionQueue) pop() (queuedAuction, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := 0; i < len(q.ring); {
		r := q.ring[i]
		if len(r) == 0 {
			i++
			continue
		}
		v := r[0]
		r[0] = nil
		q.ring[i] = r[1:]
		switch {
		case v.gone:
			q.gone--
			continue
		case i == 0 && v.lost: // it lost one since its last turn
			q.ring[1] = append(q.ring[1], v)
			continue
		}
		a := q.takeLocked(v)
		if !v.gone {
			q.ring[i] = append(q.ring[i], v) // its next turn comes after the others
		}
		if q.popped != nil {
			q.popped(v.ns, q.served-a.at, q.servedLost-a.atLost)
		}
		q.served++
		if v.lost {
			q.servedLost++
		}
		return a, true
	}
	return queuedAuction{}, false
}

// refuse counts an auction whose namespace is not valid.
func (q *auctionQueue) refuse() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.drops[AuctionDropsInvalid]++
}

// Drops returns the auctions dropped so far, by namespace.
func (q *auctionQueue) Drops() map[string]uint64 {
	d, _ := q.dropsTooLarge()
	return d
}

// dropsTooLarge is Drops and how many of them were refused for their size, read
// together (so that what NotBid subtracts is in what it subtracts from).
func (q *auctionQueue) dropsTooLarge() (map[string]uint64, uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return maps.Clone(q.drops), q.tooLarge
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
	if m.Reply == "" {
		// A bid nobody can receive would still be recorded and kept until it expires.
		n.dropReplyless(m.Subject)
		return
	}
	if !isInbox(m.Reply) {
		if n.log.Enabled(context.Background(), slog.LevelDebug) {
			n.log.Debug("request dropped: its reply subject is not an inbox", "subject", m.Subject, "reply", m.Reply)
		}
		return
	}
	ns := auctionNamespace(m.Subject)
	if !protocol.IsNamespace(ns) { // no deploy could follow; nor may it pose as a drop label
		n.auctions.refuse()
		return
	}
	n.auctions.push(ns, queuedAuction{m: m, st: steps.Start(n.log)})
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
		if ns == AuctionDropsInvalid {
			n.log.Warn("auctions refused: their subject's namespace is not a valid namespace", "dropped", d)
			continue
		}
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
