package nexlet

import (
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestBlockedWriteRecovers: a nexlet's connection (Connect, as the runner's, its
// registration dial and its self-renewal all are) to a server that stops reading (its
// link black-holed: nothing forwarded, nothing closed) while it has more to send than
// the kernel's buffers hold blocks a socket write, and nats.go holds the connection's
// lock over it. With flusherTimeout, nexd's own 10 s, the write gives up, the
// connection reconnects to the next server and answers a round trip within the bound;
// before, with nats.go's 1 min default, the nexlet's connection (its answers to the
// node, heartbeats, feeds) stayed frozen that long.
func TestBlockedWriteRecovers(t *testing.T) {
	t.Parallel()
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	p, proxied := testkit.ProxyNATS(t, srv.ClientURL())
	// The black-holed link first (Connect keeps the order); the server itself is where
	// the connection recovers.
	nc, err := Connect(protocol.NatsConnectionData{NatsServers: []string{proxied, srv.ClientURL()}}, "nexlet-blocked-write")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if nc.ConnectedUrl() == srv.ClientURL() {
		t.Fatal("connected to the server itself, not through the proxy")
	}
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		t.Fatal(err)
	}

	p.Blackhole()
	blockedAt, filled, blocked := testkit.BlockWrite(nc)
	defer func() {
		if t.Failed() {
			nc.Close() // ends the filler's blocked publish
		}
		<-filled
	}()
	if !blocked {
		t.Fatal("no write blocked")
	}
	// The write's deadline and a reconnect; well short of nats.go's 1 min.
	bound := flusherTimeout + 15*time.Second
	recovered := testkit.WaitFor(bound, func() bool {
		return nc.ConnectedUrl() == srv.ClientURL() && nc.FlushTimeout(time.Second) == nil
	})
	took := time.Since(blockedAt)
	t.Logf("recovered %v, %s after the write blocked (flusher timeout %s), %d reconnects", recovered, took.Round(10*time.Millisecond), flusherTimeout, nc.Stats().Reconnects)
	if !recovered {
		t.Fatalf("the connection did not recover within %s of a blocked write", bound)
	}
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		t.Fatalf("round trip after recovery: %v", err)
	}
}
