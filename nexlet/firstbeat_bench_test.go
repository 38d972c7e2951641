package nexlet

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// BenchmarkRegisteredToFirstHeartbeat times a nexlet's start from its registration's
// reply (sent by a node on a real server) to its first heartbeat at that node: its
// connection with the reply's credentials, its endpoints' subscriptions and the
// heartbeat, the tail of nexd's READY. One op is one Run; the span's p50 and p90 are
// reported.
//
// socket-ahead connects on a socket to the server opened before the registration
// (SocketAhead, as the native nexlet registering on its local channel does); dialled
// dials then.
func BenchmarkRegisteredToFirstHeartbeat(b *testing.B) {
	for _, ahead := range []bool{false, true} {
		name := "dialled"
		if ahead {
			name = "socket-ahead"
		}
		b.Run(name, func(b *testing.B) { benchFirstHeartbeat(b, ahead) })
	}
}

func benchFirstHeartbeat(b *testing.B, ahead bool) {
	srv := testnats.Start(b, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(b, srv)
	replied := make(chan time.Time, 1)
	_, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) {
		body, _ := json.Marshal(protocol.RegisterAgentResponse{Success: true, NodeID: node,
			ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}})
		replied <- time.Now()
		_ = m.Respond(body)
	})
	if err != nil {
		b.Fatal(err)
	}
	beats := make(chan time.Time, 16)
	if _, err := nc.Subscribe(protocol.AgentHeartbeatSubject(node, agent), func(*nats.Msg) { beats <- time.Now() }); err != nil {
		b.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		b.Fatal(err)
	}
	var spans []float64
	for b.Loop() {
		var opts []Option
		var sock *Socket
		if ahead {
			sock = SocketAhead([]string{srv.ClientURL()})
			if socketPort(sock) == 0 { // dialled while the nexlet builds itself
				b.Fatal("no socket dialled ahead")
			}
			opts = append(opts, WithConnectSocket(sock))
		}
		r, err := NewRunner(context.Background(), node, newMemAgent(), opts...)
		if err != nil {
			b.Fatal(err)
		}
		if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
			b.Fatal(err)
		}
		at := <-replied
		select {
		case beat := <-beats:
			spans = append(spans, float64(beat.Sub(at).Microseconds()))
		case <-time.After(10 * time.Second):
			b.Fatal("no first heartbeat")
		}
		if ahead && !sock.Used() {
			b.Fatal("the socket opened ahead was not taken")
		}
		sock.Close()
		if err := r.Shutdown(); err != nil {
			b.Fatal(err)
		}
		for len(beats) > 0 { // a late periodic one, or the shutdown's
			<-beats
		}
	}
	slices.Sort(spans)
	b.ReportMetric(spans[len(spans)/2], "reply-to-beat-p50-µs")
	b.ReportMetric(spans[len(spans)*9/10], "reply-to-beat-p90-µs")
}
