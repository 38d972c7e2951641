package nexlet

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// BenchmarkLogForward publishes one workload output line per op through
// Runner.Logger, as the native nexlet does for every line a workload prints, and waits
// at the end until a subscriber received every line (so delivery is included).
func BenchmarkLogForward(b *testing.B) {
	srv := testnats.Start(b, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(b, srv)
	_, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) {
		body, _ := json.Marshal(protocol.RegisterAgentResponse{Success: true, NodeID: node,
			ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}})
		_ = m.Respond(body)
	})
	if err != nil {
		b.Fatal(err)
	}
	var got atomic.Int64
	sub, err := nc.Subscribe(protocol.LogsWildcard("ns", "W1"), func(*nats.Msg) { got.Add(1) })
	if err != nil {
		b.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	_ = nc.Flush()
	r, err := NewRunner(context.Background(), node, newMemAgent(), WithHeartbeatInterval(time.Minute))
	if err != nil {
		b.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = r.Shutdown() })
	w := r.Logger("W1", "ns", "stdout")
	line := []byte(`2026-01-02T03:04:05Z INFO request served method=GET path=/api/v1/items status=200 took=1.2ms`)
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	n := int64(0)
	for b.Loop() {
		if _, err := w.Write(line); err != nil {
			b.Fatal(err)
		}
		n++
	}
	if err := r.NC().Flush(); err != nil {
		b.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for got.Load() < n && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got.Load() < n {
		b.Fatalf("subscriber got %d of %d lines", got.Load(), n)
	}
}

// BenchmarkFeedLineLatency: one workload line per op, from Runner.Logger's Write to a
// subscriber of its $NEX.FEED subject (the workload's announcement leg of a
// placement), by the way the line goes: direct (the nexlet publishes on $NEX.FEED, as
// before the relay), relay (on the node's relay subject; a stand-in node publishes it
// again on $NEX.FEED) and local (on the local channel; the node's end publishes it and
// flushes before acknowledging, as nexd does).
func BenchmarkFeedLineLatency(b *testing.B) {
	for _, way := range []string{"direct", "relay", "local"} {
		b.Run(way, func(b *testing.B) {
			srv := testnats.Start(b, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(b, srv)
			resp := protocol.RegisterAgentResponse{Success: true, NodeID: node, NexdFeedRelay: way == "relay",
				ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}}
			body, _ := json.Marshal(resp)
			if _, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) { _ = m.Respond(body) }); err != nil {
				b.Fatal(err)
			}
			// The stand-in node's relay, on its own connection as nexd's.
			relay := testnats.Connect(b, srv)
			prefix := protocol.FeedRelaySubject(node, agent, "")
			if _, err := relay.Subscribe(prefix+">", func(m *nats.Msg) {
				_ = relay.PublishMsg(&nats.Msg{Subject: "$NEX.FEED." + m.Subject[len(prefix):], Header: m.Header, Data: m.Data})
			}); err != nil {
				b.Fatal(err)
			}
			got := make(chan struct{}, 1)
			sub, err := nc.Subscribe(protocol.LogsWildcard("ns", "W1"), func(*nats.Msg) { got <- struct{}{} })
			if err != nil {
				b.Fatal(err)
			}
			_ = sub.SetPendingLimits(-1, -1)
			_ = nc.Flush()
			_ = relay.Flush()
			opts := []Option{WithHeartbeatInterval(time.Minute)}
			if way == "local" {
				nodeEnd, nexletEnd, err := localchan.Pair()
				if err != nil {
					b.Fatal(err)
				}
				s, err := localchan.NewServer(nexletEnd)
				if err != nil {
					b.Fatal(err)
				}
				c, err := localchan.NewClient(nodeEnd)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { c.Close() })
				c.OnFeed(func(batch []*nats.Msg) error {
					for _, m := range batch {
						if err := relay.PublishMsg(m); err != nil {
							return err
						}
					}
					return nil
				}, func(context.Context) error { return relay.FlushTimeout(5 * time.Second) })
				opts = append(opts, WithLocalChannel(s), WithLocalFeeds())
			}
			r, err := NewRunner(context.Background(), node, newMemAgent(), opts...)
			if err != nil {
				b.Fatal(err)
			}
			if err := r.Run(agent, resp.ConnectionData); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = r.Shutdown() })
			w := r.Logger("W1", "ns", "stdout")
			line := []byte("ready")
			for b.Loop() {
				if _, err := w.Write(line); err != nil {
					b.Fatal(err)
				}
				select {
				case <-got:
				case <-time.After(10 * time.Second):
					b.Fatal("line not received")
				}
			}
		})
	}
}

// BenchmarkFeedQueueFullPush: a line queued while no node takes the feeds and the
// buffer is full (nexd down, workloads still printing): the oldest line is dropped
// for it.
func BenchmarkFeedQueueFullPush(b *testing.B) {
	q := newFeedQueue()
	q.mode = feedHeld
	line := func(i int) *nats.Msg {
		return &nats.Msg{Subject: "$NEX.FEED.ns.logs.w.stdout", Data: []byte(fmt.Sprintf("line %08d of a workload's output", i))}
	}
	for i := 0; q.lost == 0; i++ {
		q.push(line(i))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		q.push(line(i))
	}
	b.StopTimer()
	if q.len() > FeedBufferMessages || q.bytes > FeedBufferBytes {
		b.Fatalf("queue over its bounds: %d messages, %d bytes", q.len(), q.bytes)
	}
}

// BenchmarkFeedQueueFullPushManyWorkloads: as BenchmarkFeedQueueFullPush, with the
// buffer shared by 1,000 workloads that each hold lines too (a third of it) and one
// flooding: each flooded line drops the flood's oldest, found at the top of the heap
// of workloads.
func BenchmarkFeedQueueFullPushManyWorkloads(b *testing.B) {
	q := newFeedQueue()
	q.mode = feedHeld
	line := func(w string, i int) *nats.Msg {
		return &nats.Msg{Subject: "$NEX.FEED.ns.logs." + w + ".stdout", Data: []byte(fmt.Sprintf("line %08d of a workload's output", i))}
	}
	for i := range FeedBufferMessages / 3 {
		q.push(line(fmt.Sprintf("w%d", i%1000), i))
	}
	for i := 0; q.lost == 0; i++ {
		q.push(line("flood", i))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		q.push(line("flood", i))
	}
	b.StopTimer()
	if q.len() > FeedBufferMessages || q.bytes > FeedBufferBytes || len(q.holders) != 1001 {
		b.Fatalf("queue over its bounds or lost a workload: %d messages, %d bytes, %d workloads", q.len(), q.bytes, len(q.holders))
	}
}
