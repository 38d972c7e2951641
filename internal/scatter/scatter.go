// Package scatter is the client side of a NATS scatter-gather: publish one request and
// collect every reply until they stop arriving. nexctl and nexbench share it, so both
// end an auction or a ping the same way.
package scatter

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// Options bound a gather.
type Options struct {
	First time.Duration // wait at most this long for the first reply
	Stall time.Duration // then end this long after the latest reply
	Max   int           // and stop once this many arrived (0: no limit)
	// Header goes with the request (nexd's optional extensions; others ignore them).
	Header nats.Header
	// Promise, when set, tells a responder's acknowledgement (ack: a promise of its
	// answer, not returned as a reply) from an answer, and names the responder (key).
	// While promised answers are outstanding the gather does not end Stall after the
	// latest reply: it waits for each up to Promised after its acknowledgement. So a
	// responder that said it works on an answer is not cut off by faster ones.
	Promise  func(m *nats.Msg) (key string, ack bool)
	Promised time.Duration
	// Bound ends the gather this long after the request, whatever still arrives, and
	// MaxBytes once the replies it took (acknowledgements too, ReplyCost) and those
	// waiting unread cost this many bytes (a quarter of it for the unread); either
	// returns what came with an error wrapping ErrBounded. Without
	// them (0) a responder that answers again within each Stall, or promises without
	// end, keeps the gather open for good and its replies pile up in memory: anyone
	// who sees the request may answer it.
	Bound    time.Duration
	MaxBytes int
	// Take, when set, says whether a reply is taken. One it refuses (a copy of a reply
	// taken already) is not returned, does not count toward Max and does not move the
	// stall's end: before, a copy counted as one more responder, and a gather that
	// expected n ended before the last of them answered.
	Take func(m *nats.Msg) bool
}

// ErrBounded is Gather's error once it stopped listening at Options.Bound or
// Options.MaxBytes while replies still came.
var ErrBounded = errors.New("answers kept coming past the gather's bound")

// replyOverhead is what a reply costs beyond its subject, reply, headers and data: the
// message and its header map as nats.go holds them, so a flood of empty replies counts too.
const replyOverhead = 512

// ReplyCost is what Options.MaxBytes counts for m.
func ReplyCost(m *nats.Msg) int {
	n := replyOverhead + len(m.Subject) + len(m.Reply) + len(m.Data)
	for k, vs := range m.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n
}

// Gather publishes data on subject with a fresh reply inbox and returns the replies
// that arrive: it ends Stall after the latest reply (or once promised answers came or
// their wait ran out, see Options.Promise), after First without any, at Max replies, or
// at once when the server says nobody listens. A request the server refuses (the user
// may not publish on subject or receive on its inbox) is an error naming it, not an
// empty answer. A connection that closes under the gather ends it at once with what
// came and an error wrapping ErrClosed; Options.Bound and MaxBytes with ErrBounded.
func Gather(ctx context.Context, nc *nats.Conn, subject string, data []byte, o Options) ([]*nats.Msg, error) {
	before := nc.LastError()
	inbox := nc.NewInbox()
	pending, budget := -1, o.MaxBytes
	if o.MaxBytes > 0 {
		// What waits unread shares the bound (a quarter; nats.go counts data bytes), so
		// that a reader that falls behind a flood holds at most MaxBytes in all: with
		// each its own MaxBytes, a loaded nexctl held twice that (peak RSS 306 MiB
		// against 128 MiB).
		pending = max(o.MaxBytes/4, 1)
		budget = o.MaxBytes - pending
	}
	r, err := subscribe(nc, inbox, pending)
	if err != nil {
		return nil, fmt.Errorf("subscribe for replies to %s: %w", subject, err)
	}
	defer r.Close()
	if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: data, Header: o.Header}); err != nil {
		return nil, fmt.Errorf("request %s: %w", subject, err)
	}
	if err := FlushRefused(ctx, nc, before, o.First, subject, inbox); err != nil {
		return nil, err
	}
	var out []*nats.Msg
	promised := map[string]time.Time{} // responder -> until when its answer is awaited
	timer := time.NewTimer(o.First)
	defer timer.Stop()
	var bound <-chan time.Time
	if o.Bound > 0 {
		bt := time.NewTimer(o.Bound)
		defer bt.Stop()
		bound = bt.C
	}
	held := 0
	for {
		var m *nats.Msg
		select {
		case m = <-r.next:
		case <-timer.C:
			return out, nil // quiet long enough: done
		case <-bound:
			return out, fmt.Errorf("gather %s: %w: still coming %s after the request, %d answer(s) taken", subject, ErrBounded, o.Bound, len(out))
		case <-r.ended:
			// The connection closed: nothing more comes, but what did not come is
			// unknown, not absent (a list that ended here read as "nothing more").
			return out, fmt.Errorf("gather %s: %d answer(s) came before the connection closed: %w", subject, len(out), ErrClosed)
		case <-ctx.Done():
			return out, ctx.Err()
		}
		if NoResponders(m) {
			return out, nil
		}
		if held += ReplyCost(m); o.MaxBytes > 0 && held > budget {
			return out, fmt.Errorf("gather %s: %w: past %d MiB of answers, %d answer(s) taken", subject, ErrBounded, o.MaxBytes>>20, len(out))
		}
		if o.Take != nil && !o.Take(m) {
			continue
		}
		now := time.Now()
		deadline := now.Add(o.Stall)
		ack := false
		if o.Promise != nil {
			var key string
			key, ack = o.Promise(m)
			if ack {
				promised[key] = now.Add(o.Promised)
			} else {
				delete(promised, key)
			}
			for _, until := range promised {
				deadline = latest(deadline, until)
			}
		}
		// Go 1.23's timers: Reset drops a firing not yet received.
		timer.Reset(deadline.Sub(now))
		if ack {
			continue
		}
		out = append(out, m)
		if o.Max > 0 && len(out) >= o.Max {
			return out, nil
		}
	}
}

// Replies is a subscription for the replies to one request, read with Next. They wait
// in the subscription's own list, which grows with them up to its bound (ReplyPendingBytes
// for Subscribe), and its handler hands them over one at a time. A sync subscription
// (nc.SubscribeSync) instead allocates a channel of 64Ki slots (512 KB) on every call,
// and drops replies past them, its first overflow (ErrSlowConsumer) read as the end.
type Replies struct {
	sub     *nats.Subscription
	next    chan *nats.Msg
	stop    chan struct{}
	ended   chan struct{}
	waitEnd bool
}

// ErrClosed is Next's error once the subscription ended (the connection closed).
var ErrClosed = errors.New("reply subscription closed")

// Subscribe subscribes to subject (a reply inbox) for Next; Close ends it. What waits
// unread is bounded (ReplyPendingBytes, and a count of replies): past it replies are
// dropped (Dropped counts them). Before, the list was unbounded: a reply inbox is seen
// by whoever sees the request, and a flood of answers that cost the reader more to
// check than the sender to send (a signature over 1 MB) piled up in it (187 MiB after
// 15 s of one rogue's flood on a deploy, growing for as long as the deploy waited).
func Subscribe(nc *nats.Conn, subject string) (*Replies, error) {
	return subscribe(nc, subject, ReplyPendingBytes)
}

// ReplyPendingBytes bounds what a Subscribe holds unread: as large as the largest
// max_payload a NATS server allows, so one reply that waits alone is never dropped.
const ReplyPendingBytes = 64 << 20

// heldReplyCost is what a message waiting unread costs beyond what nats.go counts of
// it (data and headers): its Msg and subject, about 100 bytes for an empty one. The
// count of messages waiting is bounded by a pending byte bound over this, so a flood
// of empty messages, which nats.go counts as 0 bytes, is bounded too: before, 3
// million empty log lines sent to a stalled logs -f all waited (live heap 297 MiB).
const heldReplyCost = 256

// StreamPendingBytes bounds what a Stream holds unread (with a count of messages, see
// heldReplyCost): past it the newest messages are dropped (Dropped counts them) and the
// stream goes on.
const StreamPendingBytes = 64 << 20

// StreamPendingMsgs is the count of messages a Stream holds unread at most.
const StreamPendingMsgs = StreamPendingBytes / heldReplyCost

// Stream subscribes to subject, a feed read for as long as the caller likes (nexctl's
// logs -f and events), for Next; Close ends it. As with Subscribe, what waits goes in
// the subscription's own list, nothing allocated ahead; unlike it, the list is bounded
// (StreamPendingBytes), since a feed has no end and its reader may stall (a paused
// pager) for good. A sync subscription allocated a 64Ki-slot channel (512 KB) per stream
// and, once it overflowed, its read said ErrSlowConsumer, which ended the stream.
func Stream(nc *nats.Conn, subject string) (*Replies, error) {
	return subscribe(nc, subject, StreamPendingBytes)
}

// Dropped is how many messages were dropped for being past the stream's bound.
func (r *Replies) Dropped() int {
	n, _ := r.sub.Dropped()
	return n
}

func subscribe(nc *nats.Conn, subject string, pendingBytes int) (*Replies, error) {
	r := &Replies{next: make(chan *nats.Msg), stop: make(chan struct{}), ended: make(chan struct{})}
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		select {
		case r.next <- m:
		case <-r.stop:
		}
	})
	if err != nil {
		return nil, err
	}
	// nats.go's delivery goroutine calls the closed handler as it ends: waiting for it
	// (Close) leaves no handler running past the subscription. Had the subscription
	// already closed (the connection closed under us), that goroutine may be gone
	// without calling it.
	sub.SetClosedHandler(func(string) { close(r.ended) })
	r.waitEnd = sub.IsValid()
	msgs := -1
	if pendingBytes > 0 {
		msgs = max(pendingBytes/heldReplyCost, 1)
	}
	_ = sub.SetPendingLimits(msgs, pendingBytes)
	r.sub = sub
	return r, nil
}

// Next returns the next reply, waiting until ctx ends (its error) or the subscription
// ends (ErrClosed).
func (r *Replies) Next(ctx context.Context) (*nats.Msg, error) {
	select {
	case m := <-r.next:
		return m, nil
	case <-r.ended:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close unsubscribes and returns once the subscription's handler is gone; replies not
// read are dropped.
func (r *Replies) Close() {
	close(r.stop)
	_ = r.sub.Unsubscribe()
	if r.waitEnd {
		<-r.ended
	}
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// NoResponders reports the server's "no responders" status reply.
func NoResponders(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header.Get("Status") == "503"
}

// FlushRefused flushes nc (for at most wait) and returns the permissions violation the
// server reported since before (nc.LastError() read before publishing or subscribing)
// for one of subjects; a subject ending in "." stands for every subject under it. The
// server sends a violation ahead of the flush's PONG, and nats.go only keeps it as the
// connection's last error (and hands it to the error handler): without this a refused
// request hears nothing, which looked like an empty answer. A flush that fails is not
// an error here: the caller's wait for replies will tell.
func FlushRefused(ctx context.Context, nc *nats.Conn, before error, wait time.Duration, subjects ...string) error {
	fctx, cancel := context.WithTimeout(ctx, wait)
	_ = nc.FlushWithContext(fctx)
	cancel()
	return Refused(nc, before, subjects...)
}

// Refused is FlushRefused without the flush, for a caller whose wait is over.
func Refused(nc *nats.Conn, before error, subjects ...string) error {
	last := nc.LastError()
	if last == nil || last == before || !errors.Is(last, nats.ErrPermissionViolation) {
		return nil
	}
	msg := last.Error()
	for _, s := range subjects {
		quoted := strconv.Quote(s)
		if strings.HasSuffix(s, ".") {
			quoted = strings.TrimSuffix(quoted, `"`)
		}
		if s != "" && strings.Contains(msg, quoted) {
			return fmt.Errorf("the NATS server refused this user: %w", last)
		}
	}
	return nil
}
