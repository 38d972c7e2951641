package localchan

import (
	"context"
	"encoding/binary"
	"errors"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// TestFeedBatches: a batch of feed messages crosses the channel whole (subjects,
// multi-valued headers, bodies, an empty one), is taken on the node's end and flushed
// before it is acknowledged, in order; one before OnFeed, or one take refuses, is
// acknowledged with an error, and so is one sent behind it before its re-send; a
// truncated encoding is refused, never half read.
func TestFeedBatches(t *testing.T) {
	c, s := pairInProcess(t)
	type ack struct {
		id  uint64
		err error
	}
	acks := make(chan ack, 8)
	s.OnFeedAck = func(id uint64, err error) { acks <- ack{id, err} }
	served := make(chan struct{})
	go func() { defer close(served); _ = s.Serve(func(*Request) {}) }()
	defer func() { _ = s.StopServing(); <-served }()
	next := func() ack {
		t.Helper()
		select {
		case a := <-acks:
			return a
		case <-time.After(10 * time.Second):
			t.Fatal("no acknowledgement")
			return ack{}
		}
	}
	batch := []*nats.Msg{
		{Subject: "$NEX.FEED.ns.logs.W1.stdout", Header: nats.Header{"a": {"1", "2"}, "b": {""}}, Data: []byte("one")},
		{Subject: "$NEX.FEED.ns.events.WORKLOADSTARTED", Data: []byte(`{"id":"W1"}`)},
		{Subject: "$NEX.FEED.ns.logs.W1.stderr"},
	}
	if err := s.SendFeeds(1, batch); err != nil {
		t.Fatal(err)
	}
	if a := next(); a.id != 1 || a.err == nil {
		t.Fatalf("a batch before OnFeed: %+v, want refused", a)
	}
	var (
		mu     sync.Mutex // the node's end calls take and flush on its goroutines
		got    []*nats.Msg
		order  []string
		refuse bool
	)
	c.OnFeed(func(b []*nats.Msg) error {
		mu.Lock()
		defer mu.Unlock()
		if refuse {
			return errors.New("not now")
		}
		got = append(got, b...)
		order = append(order, "take")
		return nil
	}, func(context.Context) error { mu.Lock(); defer mu.Unlock(); order = append(order, "flush"); return nil })
	// Sent behind the refused batch 1 (as a nexlet that had not seen the refusal):
	// refused too, never taken; the re-send after the refusal is numbered after them.
	if err := s.SendFeeds(2, batch); err != nil {
		t.Fatal(err)
	}
	if a := next(); a.id != 2 || a.err == nil {
		t.Fatalf("a batch behind a refused one: %+v, want refused", a)
	}
	id := FeedRefused(1, 2) + 1
	if err := s.SendFeeds(id, batch); err != nil {
		t.Fatal(err)
	}
	if a := next(); a.id != id || a.err != nil {
		t.Fatalf("ack %+v, want batch %d taken", a, id)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(order, []string{"take", "flush"}) {
		t.Fatalf("the node did %v, want take then flush before the acknowledgement", order)
	}
	if len(got) != 3 || got[0].Subject != batch[0].Subject || !slices.Equal(got[0].Header["a"], []string{"1", "2"}) ||
		got[0].Header.Get("b") != "" || len(got[0].Header["b"]) != 1 || string(got[0].Data) != "one" ||
		string(got[1].Data) != string(batch[1].Data) || got[1].Header != nil || got[2].Subject != batch[2].Subject || len(got[2].Data) != 0 {
		t.Fatalf("batch crossed as %+v", got)
	}
	refuse = true
	mu.Unlock()
	if err := s.SendFeeds(id+1, batch[:1]); err != nil {
		t.Fatal(err)
	}
	if a := next(); a.id != id+1 || a.err == nil || a.err.Error() != "not now" {
		t.Fatalf("ack %+v, want refused with take's error", a)
	}
	mu.Lock()
	enc := encodeFeeds(batch)
	for i := 1; i < len(enc); i++ {
		if b, err := decodeFeeds(enc[:i]); err == nil && len(b) == len(batch) {
			t.Fatalf("a batch truncated to %d of %d bytes decoded whole", i, len(enc))
		}
	}
}

// TestFeedBatchCostBoundedBySize: a rogue nexlet's feed batch costs the node a small
// multiple of its size to decode, whatever it claims: 1 MiB claiming as many header
// pairs as it has bytes, or of empty messages, is refused. Before, the first made nexd
// allocate 145 MB and the second tens of MB (a 128 MiB frame: gigabytes).
func TestFeedBatchCostBoundedBySize(t *testing.T) {
	const size = 1 << 20
	pairs := []byte{0} // an empty subject
	pairs = binary.AppendUvarint(pairs, size)
	pairs = append(pairs, make([]byte, size)...) // empty keys and values
	empty := make([]byte, size)                  // empty messages: no subject, headers or body
	for name, b := range map[string][]byte{"header pairs": pairs, "empty messages": empty} {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := decodeFeeds(b)
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Errorf("%s: a %d-byte batch decoded", name, len(b))
		}
		if got := after.TotalAlloc - before.TotalAlloc; got > 4*size {
			t.Errorf("%s: decoding a %d-byte batch allocated %d bytes", name, len(b), got)
		}
	}
	// One large message still crosses.
	big := []*nats.Msg{{Subject: "$NEX.FEED.ns.metrics.W1", Header: nats.Header{"a": {"1"}}, Data: make([]byte, 4*MaxFeedBatch)}}
	if got, err := decodeFeeds(encodeFeeds(big)); err != nil || len(got) != 1 || len(got[0].Data) != 4*MaxFeedBatch {
		t.Fatalf("one large message: %d messages, %v", len(got), err)
	}
}

// TestCloseCutsFlush: Close does not wait for flushes that cannot end (NATS gone): the
// flush in progress gets its context ended, the ones queued behind it are not waited
// for either, and Cut counts them (their batches stay the nexlet's, sent again later).
func TestCloseCutsFlush(t *testing.T) {
	c, s := pairInProcess(t)
	served := make(chan struct{})
	go func() { defer close(served); _ = s.Serve(func(*Request) {}) }()
	defer func() { _ = s.StopServing(); <-served }()
	flushing := make(chan struct{}, MaxFeedBatches)
	c.OnFeed(func([]*nats.Msg) error { return nil }, func(ctx context.Context) error {
		flushing <- struct{}{}
		<-ctx.Done() // a flush to a NATS that never answers
		return ctx.Err()
	})
	const batches = 3
	for i := range batches {
		if err := s.SendFeeds(uint64(i+1), []*nats.Msg{{Subject: "$NEX.FEED.ns.logs.W1.stdout", Data: []byte("x")}}); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-flushing:
	case <-time.After(10 * time.Second):
		t.Fatal("no flush began")
	}
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for a flush that cannot end")
	}
	if n := c.Cut(); n < 1 || n > batches {
		t.Fatalf("Cut = %d, want 1..%d", n, batches)
	}
}
