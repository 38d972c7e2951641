package nexlet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

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
// at most FeedBufferBytes and FeedBufferMessages, the oldest dropped first; the next
// message sent on a subject that lost some says how many (HeaderFeedDropped).

// Bounds of the feed buffer.
const (
	FeedBufferBytes    = 4 << 20
	FeedBufferMessages = 32768
)

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

// feedQueue is the runner's queue of feed messages.
type feedQueue struct {
	mu    sync.Mutex
	msgs  []*nats.Msg // msgs[head:] are queued, oldest first
	head  int
	bytes int
	// inflight messages at the front went in batches (oldest first) not yet
	// acknowledged, inflightBytes of them; id numbers the batches.
	inflight      int
	inflightBytes int
	batches       []sentBatch
	id            uint64
	mode          feedMode
	heldAt        time.Time     // when the channel closed (feedHeld after feedLocal)
	heldMax       time.Duration // feedHeldMax (tests shorten it)
	retryAt       time.Time     // a batch was refused: not before then
	dropped       map[string]int
	lost          int // dropped since last logged
	wake          chan struct{}
}

func newFeedQueue() *feedQueue {
	return &feedQueue{wake: make(chan struct{}, 1), dropped: map[string]int{}, heldMax: feedHeldMax}
}

func (q *feedQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *feedQueue) len() int { return len(q.msgs) - q.head }

func msgSize(m *nats.Msg) int { return localchan.FeedSize(m) }

// push queues m, dropping the oldest messages not in flight while over the bounds.
func (q *feedQueue) push(m *nats.Msg) {
	q.msgs = append(q.msgs, m)
	q.bytes += msgSize(m)
	for (q.bytes > FeedBufferBytes || q.len() > FeedBufferMessages) && q.len() > q.inflight+1 {
		i := q.head + q.inflight
		old := q.msgs[i]
		if q.inflight == 0 {
			// The oldest is the head (always so while held): the queue moves on.
			q.msgs[i] = nil
			q.head++
			q.compact()
		} else {
			copy(q.msgs[i:], q.msgs[i+1:]) // only while full with batches in flight
			q.msgs[len(q.msgs)-1] = nil
			q.msgs = q.msgs[:len(q.msgs)-1]
		}
		q.bytes -= msgSize(old)
		if len(q.dropped) >= 4096 {
			clear(q.dropped) // many workloads: the log still counts them
		}
		q.dropped[old.Subject]++
		q.lost++
	}
}

// pop forgets the n oldest messages.
func (q *feedQueue) pop(n int) {
	for i := range n {
		q.bytes -= msgSize(q.msgs[q.head+i])
		q.msgs[q.head+i] = nil
	}
	q.head += n
	if q.head == len(q.msgs) {
		q.msgs, q.head = q.msgs[:0], 0
		if cap(q.msgs) > 1024 {
			q.msgs = nil // a burst's buffer is not kept
		}
	} else {
		q.compact()
	}
}

// compact moves the queued messages to the front once the forgotten ones are half.
func (q *feedQueue) compact() {
	if q.head > len(q.msgs)/2 {
		q.msgs = append(q.msgs[:0], q.msgs[q.head:]...)
		q.head = 0
	}
}

// marked sets HeaderFeedDropped on m when messages of its subject were dropped;
// queued: m is in the queue, whose byte count follows.
func (q *feedQueue) marked(m *nats.Msg, queued bool) *nats.Msg {
	n := q.dropped[m.Subject]
	if n == 0 {
		return m
	}
	delete(q.dropped, m.Subject)
	if queued {
		q.bytes -= msgSize(m)
		defer func() { q.bytes += msgSize(m) }()
	}
	h := make(nats.Header, len(m.Header)+1)
	for k, v := range m.Header {
		h[k] = v
	}
	h.Set(HeaderFeedDropped, strconv.Itoa(n))
	m.Header = h
	return m
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
		return r.publishFeed(q.marked(m, false))
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
func (r *Runner) localFeedsGone() {
	q := r.feedq
	q.mu.Lock()
	if q.mode == feedLocal {
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
			b := q.batches[0]
			q.batches = q.batches[1:]
			if len(q.batches) == 0 {
				q.batches = q.batches[:0:0]
			}
			q.pop(b.n)
			q.inflight -= b.n
			q.inflightBytes -= b.size
			r.sendBatchLocked() // what came meanwhile
		}
	}
	q.mu.Unlock()
	q.signal()
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
		if os.Getppid() != ppid {
			q.heldAt = time.Time{} // nexd exited: wait for the next one's adoption
			return 0
		}
		r.log.Warn("local channel to the node closed while the node runs; feeds go over NATS")
		q.mode = feedNATS
		fallthrough
	case feedNATS:
		for q.len() > 0 {
			if err := r.publishFeed(q.marked(q.msgs[q.head], true)); err != nil {
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
	for q.mode == feedLocal && q.len() > q.inflight && len(q.batches) < localchan.MaxFeedBatches && q.inflightBytes < localchan.MaxFeedBatch {
		if d := time.Until(q.retryAt); d > 0 {
			return d
		}
		n, size := 0, 0
		start := q.head + q.inflight
		for start+n < len(q.msgs) {
			s := msgSize(q.msgs[start+n])
			if (n > 0 || q.inflight > 0) && q.inflightBytes+size+s > localchan.MaxFeedBatch {
				break
			}
			q.marked(q.msgs[start+n], true)
			s = msgSize(q.msgs[start+n])
			size += s
			n++
		}
		if n == 0 {
			return 0
		}
		q.id++
		// Written under the lock: the socket has room for it (at most
		// MaxFeedBatch unacknowledged), so this does not block.
		if err := r.local.SendFeeds(q.id, q.msgs[start:start+n]); err != nil {
			// The write closed the channel: serveLocal sees it and holds the feeds.
			r.log.Debug("feed batch not sent on the local channel", "err", err)
			q.unsent()
			q.mode = feedHeld
			q.heldAt = time.Now()
			return 0
		}
		q.batches = append(q.batches, sentBatch{id: q.id, n: n, size: size})
		q.inflight += n
		q.inflightBytes += size
	}
	return 0
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
