package scatter

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
)

func TestGather(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	// Three responders; the third answers late, after the stall.
	for i, delay := range []time.Duration{0, 10 * time.Millisecond, 3 * time.Second} {
		resp := testnats.Connect(t, s)
		d, id := delay, byte('a'+i)
		resp.Subscribe("svc", func(m *nats.Msg) {
			go func() {
				time.Sleep(d)
				m.Respond([]byte{id})
			}()
		})
		resp.Flush()
	}
	ctx := context.Background()
	tests := []struct {
		name string
		o    Options
		want int
	}{
		{"ends when answers stop", Options{First: 5 * time.Second, Stall: time.Second}, 2},
		{"max", Options{First: 5 * time.Second, Stall: 10 * time.Second, Max: 1}, 1},
		{"waits out a long stall", Options{First: 5 * time.Second, Stall: 6 * time.Second}, 3},
	}
	for _, tc := range tests {
		got, err := Gather(ctx, nc, "svc", nil, tc.o)
		if err != nil || len(got) != tc.want {
			t.Errorf("%s: %d replies, %v; want %d", tc.name, len(got), err, tc.want)
		}
	}
	// No responders ends the gather at once: with an hour's first-reply bound, only
	// that keeps this from hanging until the test times out.
	got, err := Gather(ctx, nc, "nobody.listens", nil, Options{First: time.Hour, Stall: time.Second})
	if err != nil || len(got) != 0 {
		t.Fatalf("no responders: %d, %v", len(got), err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Gather(cctx, nc, "svc", nil, Options{First: time.Second, Stall: time.Second}); err == nil {
		t.Fatal("cancelled context not reported")
	}
}

// A responder that acknowledges at once (a promise) and answers two seconds later is
// waited for, though a faster answer came and the stall is short; its acknowledgement
// is not a reply. Without the promise the slow answer is cut off.
func TestGatherWaitsForPromisedAnswers(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	// One connection sends the slow responder's acknowledgement and the fast one's
	// answer together, so that they come within the stall however loaded the machine
	// (from two connections, 50 ms apart at load 40 was enough to end the gather
	// before the second).
	r := testnats.Connect(t, s)
	r.Subscribe("list", func(m *nats.Msg) {
		ack := nats.NewMsg(m.Reply)
		ack.Header.Set("ack", "slow")
		r.PublishMsg(ack)
		a := nats.NewMsg(m.Reply)
		a.Header.Set("from", "fast")
		a.Data = []byte("f")
		r.PublishMsg(a)
		go func() {
			time.Sleep(2 * time.Second)
			a := nats.NewMsg(m.Reply)
			a.Header.Set("from", "slow")
			a.Data = []byte("s")
			r.PublishMsg(a)
		}()
	})
	r.Flush()
	promise := func(m *nats.Msg) (string, bool) {
		if k := m.Header.Get("ack"); k != "" {
			return k, true
		}
		return m.Header.Get("from"), false
	}
	got, err := Gather(t.Context(), nc, "list", nil, Options{First: 5 * time.Second, Stall: 300 * time.Millisecond, Promise: promise, Promised: 30 * time.Second})
	if err != nil || len(got) != 2 || string(got[0].Data)+string(got[1].Data) != "fs" {
		t.Fatalf("with the promise: %d replies, %v", len(got), err)
	}
	got, err = Gather(t.Context(), nc, "list", nil, Options{First: 5 * time.Second, Stall: 300 * time.Millisecond})
	if err != nil || len(got) != 2 || string(got[0].Data)+string(got[1].Data) != "f" { // the ack and the fast answer
		t.Fatalf("without: %d replies, %v", len(got), err)
	}
}

// A request the server refuses is an error naming the subject, not an empty answer
// (before, Gather returned no replies and no error, and nexctl printed []): publishing
// where the user may not, and asking with an inbox it may not subscribe to.
func TestGatherRefused(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) {
		o.Users = []*server.User{{Username: "t", Password: "pw", Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: []string{"mine.>"}},
			Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX_t.>"}},
		}}}
	}})
	url := strings.Replace(s.ClientURL(), "nats://", "nats://t:pw@", 1)
	o := Options{First: 5 * time.Second, Stall: 50 * time.Millisecond}
	for _, tc := range []struct {
		name, subject, want string
		opts                []nats.Option
	}{
		{"publish", "theirs.list", `Publish to "theirs.list"`, []nats.Option{nats.CustomInboxPrefix("_INBOX_t")}},
		{"inbox", "mine.list", `Subscription to "_INBOX.`, nil},
	} {
		nc, err := nats.Connect(url, tc.opts...)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		got, err := Gather(t.Context(), nc, tc.subject, nil, o)
		if !errors.Is(err, nats.ErrPermissionViolation) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %d replies, err %v; want the violation %s", tc.name, len(got), err, tc.want)
		}
		if d := time.Since(start); d > o.First/2 {
			t.Errorf("%s: the refusal took %s: waited for replies", tc.name, d)
		}
		nc.Close()
	}
	// Allowed, nobody answers: no error, as before.
	nc, err := nats.Connect(url, nats.CustomInboxPrefix("_INBOX_t"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if got, err := Gather(t.Context(), nc, "mine.list", nil, o); err != nil || len(got) != 0 {
		t.Fatalf("allowed request: %d replies, %v", len(got), err)
	}
}

// A burst is never lost: 200 responders (10 connections of 20 subscriptions) answer at
// once, and one responder's 70,000 replies arrive while the reader is held up on the
// first. The sync subscription Gather used before allocated 64Ki slots on every call
// and dropped the replies past them (a slow consumer); every one arrives now.
func TestGatherBurstLosesNoReply(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	const conns, subs = 10, 20
	for range conns {
		resp := testnats.Connect(t, s)
		for range subs {
			if _, err := resp.Subscribe("fleet", func(m *nats.Msg) { _ = m.Respond([]byte("x")) }); err != nil {
				t.Fatal(err)
			}
		}
		if err := resp.FlushTimeout(burstFlush); err != nil {
			t.Fatal(err)
		}
	}
	// Max ends a gather that got them all at once; the stall is long for a loaded machine.
	got, err := Gather(t.Context(), nc, "fleet", nil, Options{First: 10 * time.Second, Stall: 10 * time.Second, Max: conns * subs})
	if err != nil || len(got) != conns*subs {
		t.Errorf("fleet: %d replies, %v; want %d", len(got), err, conns*subs)
	}

	const flood = 70_000
	resp := testnats.Connect(t, s)
	if _, err := resp.Subscribe("flood", func(m *nats.Msg) {
		for range flood {
			if err := resp.Publish(m.Reply, []byte("x")); err != nil {
				t.Error(err)
				return
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := resp.Flush(); err != nil {
		t.Fatal(err)
	}
	held := false
	hold := func(m *nats.Msg) (string, bool) {
		if !held { // the reader is slow while the flood comes in
			held = true
			time.Sleep(time.Second)
		}
		return "", false
	}
	got, err = Gather(t.Context(), nc, "flood", nil, Options{First: 10 * time.Second, Stall: 10 * time.Second, Max: flood, Promise: hold})
	if err != nil || len(got) != flood {
		t.Errorf("flood: %d replies, %v; want %d", len(got), err, flood)
	}
}

// TestRepliesBurstLosesNoReply is TestGatherBurstLosesNoReply for a one-shot reply
// subscription read with Next (nexctl's deploy and stop): 70,000 replies that arrive
// while the reader is held up for a second are all read, in order. nexctl used a sync
// subscription there, a 64Ki-slot channel (512 KB) allocated on every call whose
// overflow dropped replies: the first read after it returned ErrSlowConsumer, which
// nexctl took for the end, so none of the 70,000 was read (the same flood, 15:55 UTC).
func TestRepliesBurstLosesNoReply(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	resp := testnats.Connect(t, s)
	const flood = 70_000
	if _, err := resp.Subscribe("flood", func(m *nats.Msg) {
		for i := range flood {
			if err := resp.Publish(m.Reply, []byte(strconv.Itoa(i))); err != nil {
				t.Error(err)
				return
			}
		}
		if err := resp.FlushTimeout(burstFlush); err != nil {
			t.Error(err)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := resp.Flush(); err != nil {
		t.Fatal(err)
	}
	inbox := nc.NewInbox()
	r, err := Subscribe(nc, inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := nc.PublishRequest("flood", inbox, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the reader is slow while the flood comes in
	got := 0
	for got < flood {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		m, err := r.Next(ctx)
		cancel()
		if err != nil {
			break
		}
		if string(m.Data) != strconv.Itoa(got) {
			t.Fatalf("reply %d says %q", got, m.Data)
		}
		got++
	}
	if got != flood {
		t.Errorf("%d replies read; want %d", got, flood)
	}
	// Closed, it reads nothing more and Next says so.
	nc.Close()
	if _, err := r.Next(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("Next after the connection closed: %v, want ErrClosed", err)
	}
}

// A connection closed under a gather ends it at once with what came (its delivery
// goroutine ends with the connection, and Gather's wait for it does not hang), as the
// sync subscription's NextMsg error did, not a stall later, and with ErrClosed: what did
// not come is unknown, not absent (nexctl says so, exit 3; before, the gather ended
// quietly and a partial list read as complete); a gather on a closed connection is an
// error.
func TestGatherConnectionClosed(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	resp := testnats.Connect(t, s)
	if _, err := resp.Subscribe("svc", func(m *nats.Msg) { _ = m.Respond([]byte("x")) }); err != nil {
		t.Fatal(err)
	}
	if err := resp.Flush(); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(200*time.Millisecond, nc.Close)
	done := make(chan struct{})
	go func() {
		defer close(done)
		got, err := Gather(t.Context(), nc, "svc", nil, Options{First: 5 * time.Second, Stall: 2 * time.Second})
		if !errors.Is(err, ErrClosed) || len(got) != 1 {
			t.Errorf("closed under the gather: %d replies, %v; want the one that came and ErrClosed", len(got), err)
		}
	}()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("Gather still runs 800 ms after its connection closed (its stall is 2 s)")
	}
	if _, err := Gather(t.Context(), nc, "svc", nil, Options{First: time.Second, Stall: time.Second}); err == nil {
		t.Error("gather on a closed connection: no error")
	}
}

// TestStreamBoundDropsAndGoesOn: a stream whose reader stalls holds what arrives up to
// its bound, drops the rest (counted), and once read again goes on with what comes
// next. A bound of 100 KB here stands for StreamPendingBytes.
func TestStreamBoundDropsAndGoesOn(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	pub := testnats.Connect(t, s)
	r, err := subscribe(nc, "feed", 100<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 1<<10)
	for range 1000 {
		if err := pub.Publish("feed", line); err != nil {
			t.Fatal(err)
		}
	}
	if err := pub.Flush(); err != nil {
		t.Fatal(err)
	}
	// The server has pub's messages and queues nc's PONG behind them: all 1000 are
	// delivered or dropped once nc's flush returns.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	read := readAll(t, r)
	t.Logf("1000 messages of 1 KiB while the reader stalled: %d read, %d dropped", read, r.Dropped())
	if read == 0 || read+r.Dropped() != 1000 || read > 101 {
		t.Errorf("%d read, %d dropped of 1000 past a 100 KiB bound", read, r.Dropped())
	}
	if err := pub.Publish("feed", []byte("after")); err != nil {
		t.Fatal(err)
	}
	m, err := r.Next(t.Context())
	if err != nil || string(m.Data) != "after" {
		t.Fatalf("after the drops: %v, %v", m, err)
	}
}

// TestGatherBounded: a responder that answers again within each stall, or floods, is
// cut off at Options.Bound or MaxBytes with what came and ErrBounded; without them
// the first kept the gather open as long as it went on.
func TestGatherBounded(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	r := testnats.Connect(t, s)
	stop := make(chan struct{})
	defer close(stop)
	r.Subscribe("endless", func(m *nats.Msg) {
		go func() {
			for i := 0; i < 1000; i++ { // 20 s at most
				m.Respond([]byte("again"))
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}()
	})
	r.Subscribe("flood", func(m *nats.Msg) {
		for i := 0; i < 100; i++ {
			m.Respond(make([]byte, 100_000))
		}
	})
	r.Flush()
	start := time.Now()
	got, err := Gather(context.Background(), nc, "endless", nil, Options{First: time.Second, Stall: time.Second, Bound: 500 * time.Millisecond})
	if !errors.Is(err, ErrBounded) || len(got) == 0 || time.Since(start) > 5*time.Second {
		t.Errorf("endless answers: %d in %s, %v; want some and ErrBounded at 500ms", len(got), time.Since(start), err)
	}
	got, err = Gather(context.Background(), nc, "flood", nil, Options{First: time.Second, Stall: time.Second, MaxBytes: 1 << 20})
	held := 0
	for _, m := range got {
		held += ReplyCost(m)
	}
	if !errors.Is(err, ErrBounded) || held > 1<<20 || len(got) < 5 {
		t.Errorf("flood: %d answers, %d bytes held, %v; want at most 1 MiB and ErrBounded", len(got), held, err)
	}
}

// burstFlush bounds these tests' flushes (of 200 subscriptions, of a burst of 70,000
// replies): nats.go's 10 s was too
// short for a -race responder on a loaded 2-core host (TestRepliesBurstLosesNoReply,
// "nats: timeout", in a fresh-clone CI at load 45).
const burstFlush = time.Minute

// TestRepliesBoundedUnderFlood: a reply inbox is seen by whoever sees the request, and
// its reader may fall behind a flood of answers that cost it more to check than they
// cost to send (a signature over 1 MB each). Here the reader stalls while 100 answers
// of 1 MB and then 400,000 empty ones come. Before, Subscribe's list had no bound and
// held them all (100 MB, then 300,000 messages); now it holds at most
// ReplyPendingBytes, and a count of messages (an empty one counts 0 bytes in nats.go),
// drops the rest, counted, and the answer sent after the flood is still read.
func TestRepliesBoundedUnderFlood(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	pub := testnats.Connect(t, s)
	inbox := nc.NewInbox()
	r, err := Subscribe(nc, inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 1000_000)
	const bigs, empties = 100, 300_000
	for range bigs {
		if err := pub.Publish(inbox, big); err != nil {
			t.Fatal(err)
		}
	}
	for range empties {
		if err := pub.Publish(inbox, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := pub.Flush(); err != nil {
		t.Fatal(err)
	}
	// The server queues nc's PONG behind pub's messages: all are delivered or dropped
	// once nc's flush returns. One of them waits in the handler, not in the list.
	if err := nc.FlushTimeout(time.Minute); err != nil {
		t.Fatal(err)
	}
	msgs, bytes, err := r.sub.MaxPending()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d answers of 1 MB and %d empty ones to a stalled reader: at most %d messages, %d MiB waited; %d dropped",
		bigs, empties, msgs, bytes>>20, r.Dropped())
	// nats.go counts the message it then drops in its maximum: one over the bound.
	if bytes > ReplyPendingBytes+len(big) || msgs > ReplyPendingBytes/heldReplyCost+1 {
		t.Errorf("%d messages, %d MiB waited unread; want at most %d and %d MiB", msgs, bytes>>20, ReplyPendingBytes/heldReplyCost, ReplyPendingBytes>>20)
	}
	if r.Dropped() == 0 {
		t.Error("nothing dropped past the bound")
	}
	// The reader catches up and reads what comes after the flood.
	readAll(t, r)
	if err := pub.Publish(inbox, []byte("answer")); err != nil {
		t.Fatal(err)
	}
	m, err := r.Next(t.Context())
	if err != nil || string(m.Data) != "answer" {
		t.Fatalf("after the flood: %v, %v", m, err)
	}
}

// readAll reads r until nothing comes for a second, and returns how many it read.
func readAll(t *testing.T, r *Replies) int {
	t.Helper()
	read := 0
	for {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		_, err := r.Next(ctx)
		cancel()
		if err != nil {
			return read
		}
		read++
	}
}
