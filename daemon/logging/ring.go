package logging

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// Record is a logged record as the control socket serves it (`nexctl logs`).
type Record struct {
	Time  time.Time         `json:"time"`
	Level slog.Level        `json:"level"`
	Msg   string            `json:"msg"`
	Attrs map[string]string `json:"attrs,omitempty"` // group members as "group.key"
}

// followBuffer is how far a follower may lag before records are dropped for it;
// logging never waits for a slow reader.
const followBuffer = 256

type ring struct {
	mu   sync.Mutex
	buf  []Record
	next int
	full bool
	// followers maps each follower's channel to the channel that lets its watcher go
	// (closeFollowers); watchers waits for those goroutines.
	followers map[chan Record]chan struct{}
	watchers  sync.WaitGroup
	closed    bool
}

func newRing(n int) *ring {
	return &ring{buf: make([]Record, n), followers: map[chan Record]chan struct{}{}}
}

func (r *ring) add(rec Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf[r.next] = rec
	r.next = (r.next + 1) % len(r.buf)
	if r.next == 0 {
		r.full = true
	}
	for ch := range r.followers {
		select {
		case ch <- rec:
		default:
		}
	}
}

func (r *ring) recent(filter func(Record) bool) []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	var all []Record
	if r.full {
		all = append(slices.Clone(r.buf[r.next:]), r.buf[:r.next]...)
	} else {
		all = slices.Clone(r.buf[:r.next])
	}
	if filter == nil {
		return all
	}
	return slices.DeleteFunc(all, func(rec Record) bool { return !filter(rec) })
}

func (r *ring) follow(ctx context.Context) <-chan Record {
	ch := make(chan Record, followBuffer)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		close(ch)
		return ch
	}
	// The watcher ends the follower at ctx's end, or ends itself when the ring let the
	// follower go first (closeFollowers, which waits for it): never parked past both.
	done := make(chan struct{})
	r.followers[ch] = done
	r.watchers.Go(func() {
		select {
		case <-ctx.Done():
			r.unfollow(ch)
		case <-done:
		}
	})
	return ch
}

// unfollow closes ch unless closeFollowers did.
func (r *ring) unfollow(ch chan Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.followers[ch]; ok {
		delete(r.followers, ch)
		close(ch)
	}
}

// closeFollowers closes every follower's channel and returns once their watchers have
// ended; follow starts none afterwards.
func (r *ring) closeFollowers() {
	r.mu.Lock()
	r.closed = true
	for ch, done := range r.followers {
		delete(r.followers, ch)
		close(ch)
		close(done)
	}
	r.mu.Unlock()
	r.watchers.Wait()
}

// Recent returns the kept records, oldest first, that filter accepts (nil = all).
func (l *Logger) Recent(filter func(Record) bool) []Record { return l.core.ring.recent(filter) }

// Follow streams records logged from now on until ctx ends or the logger is
// closed; the channel is then closed. A reader that falls behind loses records.
func (l *Logger) Follow(ctx context.Context) <-chan Record { return l.core.ring.follow(ctx) }

// ringHandler feeds the ring and followers.
type ringHandler struct {
	ring   *ring
	attrs  map[string]string
	prefix string
}

func (h *ringHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *ringHandler) Handle(_ context.Context, r slog.Record) error {
	rec := Record{Time: r.Time, Level: r.Level, Msg: r.Message}
	if len(h.attrs) > 0 || r.NumAttrs() > 0 {
		rec.Attrs = make(map[string]string, len(h.attrs)+r.NumAttrs())
		for k, v := range h.attrs {
			rec.Attrs[k] = v
		}
		r.Attrs(func(a slog.Attr) bool {
			flatten(rec.Attrs, h.prefix, a)
			return true
		})
	}
	h.ring.add(rec)
	return nil
}

func (h *ringHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	n := &ringHandler{ring: h.ring, prefix: h.prefix, attrs: make(map[string]string, len(h.attrs)+len(attrs))}
	for k, v := range h.attrs {
		n.attrs[k] = v
	}
	for _, a := range attrs {
		flatten(n.attrs, h.prefix, a)
	}
	return n
}

func (h *ringHandler) WithGroup(name string) slog.Handler {
	return &ringHandler{ring: h.ring, attrs: h.attrs, prefix: h.prefix + name + "."}
}

func flatten(m map[string]string, prefix string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Value.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "."
		}
		for _, ga := range a.Value.Group() {
			flatten(m, p, ga)
		}
		return
	}
	if a.Key != "" {
		m[prefix+a.Key] = a.Value.String()
		if _, ok := wellKnown(a.Key); ok && prefix != "" {
			// nexlet, workload_id and namespace filter `nexctl logs` wherever they sit,
			// as they do in the journal.
			m[a.Key] = a.Value.String()
		}
	}
}
