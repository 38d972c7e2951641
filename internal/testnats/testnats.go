// Package testnats starts real in-process nats-servers for tests: random loopback port,
// JetStream in a temporary directory, shut down when the test ends.
package testnats

import (
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Options tweak the server; the zero value gives a plain server with JetStream.
type Options struct {
	NoJetStream bool
	Domain      string
	// Configure, when set, may change the server options before start
	// (operator mode, accounts, clustering).
	Configure func(*server.Options)
}

// Start runs a nats-server for the duration of t.
func Start(t testing.TB, o Options) *server.Server {
	t.Helper()
	opts := &server.Options{
		Host:            "127.0.0.1",
		Port:            -1,
		NoLog:           true,
		NoSigs:          true,
		JetStream:       !o.NoJetStream,
		StoreDir:        t.TempDir(),
		JetStreamDomain: o.Domain,
	}
	if o.Configure != nil {
		o.Configure(opts)
	}
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("testnats: new server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatalf("testnats: server not ready")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

// Connect opens a client connection to s, closed when the test ends.
func Connect(t testing.TB, s *server.Server, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL(), opts...)
	if err != nil {
		t.Fatalf("testnats: connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}
