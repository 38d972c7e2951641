package scatter

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
)

// BenchmarkGather is one gather of n replies (Max n ends it, so no stall is timed):
// its allocations are what a nexctl or nexbench call costs the client.
func BenchmarkGather(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("responders=%d", n), func(b *testing.B) {
			s := testnats.Start(b, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(b, s)
			resp := testnats.Connect(b, s)
			for range n {
				if _, err := resp.Subscribe("svc", func(m *nats.Msg) { _ = m.Respond([]byte("x")) }); err != nil {
					b.Fatal(err)
				}
			}
			if err := resp.Flush(); err != nil {
				b.Fatal(err)
			}
			o := Options{First: 5 * time.Second, Stall: time.Second, Max: n}
			b.ReportAllocs()
			for b.Loop() {
				got, err := Gather(b.Context(), nc, "svc", nil, o)
				if err != nil || len(got) != n {
					b.Fatalf("%d replies, %v; want %d", len(got), err, n)
				}
			}
		})
	}
}

// BenchmarkOneShotReply is one request and its one reply read from a subscription of
// its own, as nexctl's deploy and stop read theirs: sub=sync is the sync subscription
// they used (its 64Ki-slot channel allocated on every call), sub=replies Subscribe.
func BenchmarkOneShotReply(b *testing.B) {
	s := testnats.Start(b, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(b, s)
	resp := testnats.Connect(b, s)
	if _, err := resp.Subscribe("svc", func(m *nats.Msg) { _ = m.Respond([]byte("x")) }); err != nil {
		b.Fatal(err)
	}
	if err := resp.Flush(); err != nil {
		b.Fatal(err)
	}
	b.Run("sub=sync", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			inbox := nc.NewInbox()
			sub, err := nc.SubscribeSync(inbox)
			if err != nil {
				b.Fatal(err)
			}
			if err := nc.PublishRequest("svc", inbox, nil); err != nil {
				b.Fatal(err)
			}
			if _, err := sub.NextMsgWithContext(b.Context()); err != nil {
				b.Fatal(err)
			}
			_ = sub.Unsubscribe()
		}
	})
	b.Run("sub=replies", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			inbox := nc.NewInbox()
			r, err := Subscribe(nc, inbox)
			if err != nil {
				b.Fatal(err)
			}
			if err := nc.PublishRequest("svc", inbox, nil); err != nil {
				b.Fatal(err)
			}
			if _, err := r.Next(b.Context()); err != nil {
				b.Fatal(err)
			}
			r.Close()
		}
	})
}

// BenchmarkStreamOpen: a stream opened, one message read, closed (nexctl's logs -f and
// events open one per run): a sync subscription (the old way) beside Stream.
func BenchmarkStreamOpen(b *testing.B) {
	s := testnats.Start(b, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(b, s)
	pub := testnats.Connect(b, s)
	read := func(b *testing.B, open func(string) (func(context.Context) error, func())) {
		b.ReportAllocs()
		for b.Loop() {
			subject := nc.NewInbox()
			next, closeFn := open(subject)
			if err := nc.Flush(); err != nil {
				b.Fatal(err)
			}
			if err := pub.Publish(subject, []byte("line")); err != nil {
				b.Fatal(err)
			}
			if err := next(b.Context()); err != nil {
				b.Fatal(err)
			}
			closeFn()
		}
	}
	b.Run("sub=sync", func(b *testing.B) {
		read(b, func(subject string) (func(context.Context) error, func()) {
			sub, err := nc.SubscribeSync(subject)
			if err != nil {
				b.Fatal(err)
			}
			return func(ctx context.Context) error { _, err := sub.NextMsgWithContext(ctx); return err }, func() { _ = sub.Unsubscribe() }
		})
	})
	b.Run("sub=stream", func(b *testing.B) {
		read(b, func(subject string) (func(context.Context) error, func()) {
			r, err := Stream(nc, subject)
			if err != nil {
				b.Fatal(err)
			}
			return func(ctx context.Context) error { _, err := r.Next(ctx); return err }, r.Close
		})
	})
}
