package nexlet

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
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
