package nexlet

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// A runner's feed messages (its workloads' log lines, metrics and events) leave in the
// order they were written, through one queue:
//   - on the local channel to the nexd that spawned it (WithLocalFeeds): in batches,
//     up to localchan.MaxFeedBatches unacknowledged; the node acknowledges a batch once
//     the NATS server has it, and only then is it forgotten here; after a refusal the
//     batches from the refused one on are sent again, in order;
//   - else on NATS at once (the node's relay subject, or $NEX.FEED itself).
//
// While no node takes them (the channel's peer closed: nexd exited, was killed or
// re-executes; until this nexlet registered again with the next one), they are kept,
// at most FeedBufferBytes and FeedBufferMessages. Over that, the oldest unsent line of
// the workload holding the most goes (bytes plus feedEntryCost per message): one
// flooding workload loses its own lines, not the others'; events (WORKLOADSTOPPED:
// without it the node never hears of the end) go only when no line is left. The next
// message sent on a subject that lost some says how many (HeaderFeedDropped).

// Bounds of the feed buffer.
const (
	FeedBufferBytes    = 4 << 20
	FeedBufferMessages = 32768
)

// feedEntryCost is what a message counts towards its workload's share besides its
// bytes: the byte bound's share of one message, so that a workload of many short lines
// and one of few long ones compare by how much of either bound they take.
const feedEntryCost = FeedBufferBytes / FeedBufferMessages

// HeaderFeedDropped is set on a feed message when the nexlet dropped that many earlier
// messages of the same subject from its full buffer.
const HeaderFeedDropped = protocol.HeaderFeedDropped

// feedHeldMax is how long the feeds wait after the channel closed while the nexd that
// spawned this nexlet still runs (its parent is the same): a channel that broke on its
// own (a write that timed out) is followed by no new registration, so after this the
// feeds go over NATS. A nexd that exited is waited for without end.
const feedHeldMax = 15 * time.Second

// feedRetry is the wait before a batch the node did not take is sent again.
const feedRetry = 250 * time.Millisecond

type feedMode int

const (
	feedHeld  feedMode = iota // kept until a node takes them
	feedLocal                 // on the local channel
	feedNATS                  // on NATS
)

// feedQueue is the runner's queue of feed messages: a list, oldest first, whose first
// inflight entries went in batches not yet acknowledged; each workload's unsent lines
// are also a list of their own (feedHolder), so that a drop takes the oldest of the
// workload holding the most, found at the top of a heap, in O(log workloads).
type feedQueue struct {
	mu          sync.Mutex
	first, last *feedEntry
	unsentHead  *feedEntry // the first entry not in flight; nil: none
	n           int        // entries
	bytes       int
	// inflight entries at the front went in batches (oldest first) not yet
	// acknowledged, inflightBytes of them; id numbers the batches.
	inflight      int
	inflightBytes int
	batches       []sentBatch
	id            uint64
	holders       map[string]*feedHolder // by workload id, those with unsent lines
	heap          holderHeap             // the same, the one holding the most first
	scratch       []*nats.Msg            // a batch being sent
	free          *feedEntry             // entries to reuse (linked by next), nfree of them
	// The last line's subject, workload id and holder: a flood's lines need no
	// parse and no lookup.
	lastSubject, lastKey string
	lastHolder           *feedHolder
	nfree                int
	mode                 feedMode
	heldAt               time.Time     // when the channel closed (feedHeld after feedLocal)
	heldMax              time.Duration // feedHeldMax (tests shorten it)
	// node is the adopting node's process when the channel is its socket (zero: the
	// pair, whose node is this nexlet's parent): whether it still runs tells a
	// channel that broke under a live node from one whose node went away.
	node    procid.ID
	retryAt time.Time // a batch was refused: not before then
	dropped map[string]int
	lost    int // dropped since last logged
	wake    chan struct{}
}

// feedEntry is a queued message.
type feedEntry struct {
	m          *nats.Msg
	size       int    // msgSize(m), as counted in bytes
	key        string // its workload id when it is a log line or metrics; "" (an event): never dropped for a line
	prev, next *feedEntry
	// w is the holder whose unsent lines it is among (nil: in flight, or an event);
	// wnext the holder's next; cost what it counts in the holder's.
	w     *feedHolder
	wnext *feedEntry
	cost  int
}

// feedHolder is a workload's unsent lines, oldest first.
type feedHolder struct {
	key         string
	first, last *feedEntry
	cost        int
	idx         int // in feedQueue.heap
}

func newFeedQueue() *feedQueue {
	return &feedQueue{wake: make(chan struct{}, 1), dropped: map[string]int{}, holders: map[string]*feedHolder{}, heldMax: feedHeldMax}
}

func (q *feedQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *feedQueue) len() int { return q.n }

func msgSize(m *nats.Msg) int { return localchan.FeedSize(m) }

// feedKey is the workload id of a log or metrics subject ($NEX.FEED.<ns>.logs.<id>.<stream>,
// $NEX.FEED.<ns>.metrics.<id>), else "".
func feedKey(subject string) string {
	rest, ok := strings.CutPrefix(subject, "$NEX.FEED.")
	if !ok {
		return ""
	}
	_, rest, _ = strings.Cut(rest, ".") // the namespace
	kind, rest, _ := strings.Cut(rest, ".")
	if kind != "logs" && kind != "metrics" {
		return ""
	}
	id, _, _ := strings.Cut(rest, ".")
	return id
}

// push queues m; over the bounds, it drops unsent messages (see the top of this file),
// never the last one unsent.
func (q *feedQueue) push(m *nats.Msg) {
	e := q.free
	if e != nil {
		// Field by field: a struct copy costs a bulk write barrier while the GC runs.
		q.free, q.nfree = e.next, q.nfree-1
		e.m, e.size, e.prev, e.next = m, msgSize(m), q.last, nil
	} else {
		e = &feedEntry{m: m, size: msgSize(m), prev: q.last}
	}
	if m.Subject != q.lastSubject { // a writer's lines share their subject's string: compared in O(1)
		q.lastSubject, q.lastKey = m.Subject, feedKey(m.Subject)
	}
	e.key = q.lastKey
	if q.last != nil {
		q.last.next = e
	} else {
		q.first = e
	}
	q.last = e
	if q.unsentHead == nil {
		q.unsentHead = e
	}
	q.n++
	q.bytes += e.size
	q.attach(e, false)
	for (q.bytes > FeedBufferBytes || q.n > FeedBufferMessages) && q.n > q.inflight+1 {
		victim := q.unsentHead // only events are unsent: the oldest goes
		if len(q.heap) > 0 {
			victim = q.heap[0].first
		}
		if len(q.dropped) >= 4096 {
			clear(q.dropped) // many workloads: the log still counts them
		}
		// A count it carries (its batch was refused) passes to the next one.
		q.dropped[victim.m.Subject] += 1 + droppedCount(victim.m)
		q.lost++
		q.detach(victim)
		q.unlink(victim)
	}
}

// unlink takes e out of the queue.
func (q *feedQueue) unlink(e *feedEntry) {
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		q.first = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		q.last = e.prev
	}
	if q.unsentHead == e {
		q.unsentHead = e.next
	}
	q.n--
	q.bytes -= e.size
	e.m, e.prev, e.next = nil, nil, nil // e.w, e.wnext: nil since detach
	if q.nfree < feedFreeMax {
		e.next, q.free, q.nfree = q.free, e, q.nfree+1
	}
}

// feedFreeMax bounds the entries kept for reuse: a full buffer drops one for each it
// takes, and needs no allocation then.
const feedFreeMax = 256

// attach adds line e to its workload's unsent lines: last (queued), or first (taken
// back from flight, newest first).
func (q *feedQueue) attach(e *feedEntry, front bool) {
	if e.key == "" {
		return
	}
	h := q.lastHolder
	if h == nil || h.key != e.key {
		h = q.holders[e.key]
	}
	fresh := h == nil
	if fresh {
		h = &feedHolder{key: e.key}
		q.holders[e.key] = h
	}
	q.lastHolder = h
	e.w, e.cost = h, e.size+feedEntryCost
	switch {
	case h.first == nil:
		h.first, h.last = e, e
	case front:
		e.wnext, h.first = h.first, e
	default:
		h.last.wnext, h.last = e, e
	}
	h.cost += e.cost
	if fresh {
		heap.Push(&q.heap, h)
	} else {
		heap.Fix(&q.heap, h.idx)
	}
}

// detach takes e, its workload's oldest unsent line (sent or dropped), out of its
// workload's lines.
func (q *feedQueue) detach(e *feedEntry) {
	h := e.w
	if h == nil {
		return
	}
	h.first, e.w, e.wnext = e.wnext, nil, nil
	h.cost -= e.cost
	if h.first != nil {
		heap.Fix(&q.heap, h.idx)
		return
	}
	h.last = nil
	delete(q.holders, h.key)
	if q.lastHolder == h {
		q.lastHolder = nil
	}
	heap.Remove(&q.heap, h.idx)
}

// holderHeap orders the workloads with unsent lines by what they hold, the most
// first (container/heap); each holder knows its index, for heap.Fix and heap.Remove.
type holderHeap []*feedHolder

func (hh holderHeap) Len() int           { return len(hh) }
func (hh holderHeap) Less(i, j int) bool { return hh[i].cost > hh[j].cost }
func (hh holderHeap) Swap(i, j int) {
	hh[i], hh[j] = hh[j], hh[i]
	hh[i].idx, hh[j].idx = i, j
}
func (hh *holderHeap) Push(x any) {
	h := x.(*feedHolder)
	h.idx = len(*hh)
	*hh = append(*hh, h)
}
func (hh *holderHeap) Pop() any {
	old := *hh
	h := old[len(old)-1]
	old[len(old)-1] = nil // the holder is garbage once its workload's lines are gone
	*hh = old[:len(old)-1]
	return h
}

// pop forgets the n oldest entries, which were sent.
func (q *feedQueue) pop(n int) {
	for range n {
		e := q.first
		q.detach(e) // unsent when published at once on NATS
		q.unlink(e)
	}
}

// mark sets HeaderFeedDropped on m when messages of its subject were dropped, adding to
// a count it has (set before its batch was refused), and reports whether it did.
func (q *feedQueue) mark(m *nats.Msg) bool {
	n := q.dropped[m.Subject]
	if n == 0 {
		return false
	}
	delete(q.dropped, m.Subject)
	h := make(nats.Header, len(m.Header)+1)
	for k, v := range m.Header {
		h[k] = v
	}
	h.Set(HeaderFeedDropped, strconv.Itoa(n+droppedCount(m)))
	m.Header = h
	return true
}

// droppedCount is the HeaderFeedDropped count m carries.
func droppedCount(m *nats.Msg) int {
	v := m.Header.Get(HeaderFeedDropped)
	if v == "" {
		return 0 // most: Atoi would allocate its error
	}
	n, _ := strconv.Atoi(v)
	return max(n, 0)
}

// marked is mark for a queued entry, whose size follows.
func (q *feedQueue) marked(e *feedEntry) *nats.Msg {
	if q.mark(e.m) {
		q.bytes -= e.size
		e.size = msgSize(e.m)
		q.bytes += e.size
	}
	return e.m
}

// WithLocalFeeds sends the workloads' feeds on the local channel (WithLocalChannel),
// for a node that said it takes them there (localchan.TakesFeeds).
func WithLocalFeeds() Option { return func(r *Runner) { r.localFeeds = true } }

// feedOut sends m (its subject a $NEX.FEED one) or queues it.
func (r *Runner) feedOut(m *nats.Msg) error {
	q := r.feedq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.mode == feedNATS && q.len() == 0 {
		// Under the lock, so that nothing queued earlier goes out after it.
		q.mark(m)
		return r.publishFeed(m)
	}
	q.push(m)
	if q.mode == feedLocal {
		if r.sendBatchLocked() > 0 {
			q.signal() // the feed goroutine retries
		}
		return nil
	}
	q.signal()
	return nil
}

// publishFeed publishes m on NATS where this nexlet's feeds go.
func (r *Runner) publishFeed(m *nats.Msg) error {
	nc := r.NC()
	if nc == nil {
		return errors.New("nexlet feed: runner is not connected")
	}
	out := &nats.Msg{Subject: r.feedSubject(m.Subject), Header: m.Header, Data: m.Data}
	if err := nc.PublishMsg(out); err != nil {
		return fmt.Errorf("nexlet feed %s: %w", m.Subject, err)
	}
	return nil
}

// setFeedMode moves the queue to mode (Run, Reregister).
func (r *Runner) setFeedMode(mode feedMode) {
	q := r.feedq
	q.mu.Lock()
	q.unsent() // unacknowledged batches are sent again
	q.mode = mode
	q.mu.Unlock()
	q.signal()
}

// localFeedsGone holds the feeds that went on the local channel, which closed.
func (r *Runner) localFeedsGone(local *localchan.Server) {
	q := r.feedq
	q.mu.Lock()
	if q.mode == feedLocal && r.local == local {
		q.mode, q.heldAt = feedHeld, time.Now()
		q.unsent()
	}
	q.mu.Unlock()
	q.signal()
}

// feedAck is the node's acknowledgement of batch id on the local channel.
func (r *Runner) feedAck(id uint64, err error) {
	q := r.feedq
	q.mu.Lock()
	// Acknowledgements come in the order the batches went; one of a batch sent
	// before a refusal (or a closed channel) is stale.
	if q.mode == feedLocal && len(q.batches) > 0 && id == q.batches[0].id {
		if err != nil {
			q.retryAt = time.Now().Add(feedRetry)
			q.id = localchan.FeedRefused(id, q.id) // the node refuses those sent behind it
			r.log.Debug("node did not take a feed batch; sending it again", "messages", q.inflight, "err", err)
			q.unsent() // and those after it, in order
		} else {
			q.acked()
			r.sendBatchLocked() // what came meanwhile
		}
	}
	q.mu.Unlock()
	q.signal()
}

// acked forgets the oldest batch in flight, which the node took.
func (q *feedQueue) acked() {
	b := q.batches[0]
	q.batches = q.batches[1:]
	if len(q.batches) == 0 {
		q.batches = q.batches[:0:0]
	}
	q.pop(b.n)
	q.inflight -= b.n
	q.inflightBytes -= b.size
}

// feedLoop sends what is queued until ctx ends; the runner waits for it (Shutdown).
func (r *Runner) feedLoop(ctx context.Context) {
	q := r.feedq
	ppid := os.Getppid()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		wait := r.feedStep(ppid)
		if wait > 0 {
			timer.Reset(wait)
		}
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-q.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// feedStep sends what it can now; a positive wait asks to be called again after it.
func (r *Runner) feedStep(ppid int) (wait time.Duration) {
	q := r.feedq
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.lost > 0 && q.mode != feedHeld {
		r.log.Warn("feed buffer full: dropped the oldest messages", "dropped", q.lost,
			"limit_bytes", FeedBufferBytes, "limit_messages", FeedBufferMessages)
		q.lost = 0
	}
	switch q.mode {
	case feedHeld:
		if q.heldAt.IsZero() {
			return 0
		}
		if d := time.Until(q.heldAt.Add(q.heldMax)); d > 0 {
			return d
		}
		gone := os.Getppid() != ppid
		if q.node.PID != 0 {
			gone = !q.node.Alive() // an adopting node's socket: its process
		}
		if gone {
			q.heldAt = time.Time{} // nexd exited: wait for the next one's adoption
			return 0
		}
		r.log.Warn("local channel to the node closed while the node runs; feeds go over NATS")
		q.mode = feedNATS
		fallthrough
	case feedNATS:
		for q.first != nil {
			if err := r.publishFeed(q.marked(q.first)); err != nil {
				r.log.Debug("feed message not published", "err", err)
			}
			q.pop(1)
		}
		return 0
	}
	return r.sendBatchLocked()
}

// What is sent on the local channel and not yet acknowledged is bounded by
// localchan.MaxFeedBatches batches (a line need not wait for the node's flush of the
// one before) and MaxFeedBatch bytes in all (what may be ahead of a start's reply in
// the socket).

// sentBatch is a batch sent on the local channel and not yet acknowledged.
type sentBatch struct {
	id      uint64
	n, size int
}

// unsent takes every unacknowledged batch back: they are sent again, in order.
func (q *feedQueue) unsent() {
	e := q.last
	if q.unsentHead != nil {
		e = q.unsentHead.prev
	}
	for ; e != nil; e = e.prev { // the entries in flight, newest first
		q.attach(e, true)
	}
	q.unsentHead = q.first
	q.inflight, q.inflightBytes, q.batches = 0, 0, nil
}

// sendBatchLocked sends what is queued on the local channel, within the bounds of
// what may be unacknowledged; a positive wait asks to be called again after it (a
// refused batch's retry). Called with q.mu held: from feedOut and the node's
// acknowledgement at once, so a line does not wait for the feed goroutine to wake (a
// placement's announcement is a workload's first line); from the feed goroutine for
// a retry.
func (r *Runner) sendBatchLocked() (wait time.Duration) {
	q := r.feedq
	for q.mode == feedLocal && q.unsentHead != nil && len(q.batches) < localchan.MaxFeedBatches && q.inflightBytes < localchan.MaxFeedBatch {
		if d := time.Until(q.retryAt); d > 0 {
			return d
		}
		batch, size, end := q.nextBatch()
		q.id++
		// Written under the lock: the socket has room for it (at most
		// MaxFeedBatch unacknowledged), so this does not block.
		err := r.local.SendFeeds(q.id, batch)
		clear(batch)
		q.scratch = batch[:0]
		if err != nil {
			// The write closed the channel: serveLocal sees it and holds the feeds.
			r.log.Debug("feed batch not sent on the local channel", "err", err)
			q.unsent()
			q.mode = feedHeld
			q.heldAt = time.Now()
			return 0
		}
		q.batchSent(end, len(batch), size)
	}
	return 0
}

// nextBatch is the next batch of unsent messages (marked), within what may be
// unacknowledged, size bytes of them, and the first entry after it.
func (q *feedQueue) nextBatch() (batch []*nats.Msg, size int, end *feedEntry) {
	batch = q.scratch[:0]
	end = q.unsentHead
	for ; end != nil; end = end.next {
		if (len(batch) > 0 || q.inflight > 0) && q.inflightBytes+size+end.size > localchan.MaxFeedBatch {
			break
		}
		batch = append(batch, q.marked(end))
		size += end.size
	}
	return batch, size, end
}

// batchSent records the batch nextBatch made (n messages, size bytes, end after it) as
// sent, numbered q.id.
func (q *feedQueue) batchSent(end *feedEntry, n, size int) {
	for e := q.unsentHead; e != end; e = e.next {
		q.detach(e) // in flight: no longer dropped for a line
	}
	q.unsentHead = end
	q.batches = append(q.batches, sentBatch{id: q.id, n: n, size: size})
	q.inflight += n
	q.inflightBytes += size
}

// drainFeeds waits (at most wait) until every queued feed message is sent (and, on
// the channel, acknowledged), or none can be (no node takes them).
func (r *Runner) drainFeeds(wait time.Duration) {
	q := r.feedq
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		q.mu.Lock()
		done := q.len() == 0 || q.mode == feedHeld
		q.mu.Unlock()
		if done {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// feedCount is what the queue holds (tests).
func (r *Runner) feedCount() int {
	r.feedq.mu.Lock()
	defer r.feedq.mu.Unlock()
	return r.feedq.len()
}
