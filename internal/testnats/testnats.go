// Package testnats starts real in-process nats-servers for tests: random loopback port,
// JetStream in a temporary directory, shut down when the test ends.
package testnats

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
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
		AuthTimeout:     authTimeout.Seconds(),
		// The server's first PING to a client, for its RTT, comes 2-2.4 s after the
		// accept, whether or not the client's CONNECT and PING were answered yet; nats.go
		// takes a PING before its PONG for a failed connect (nats-server issue 1174).
		// Under -race at load 16, a fixture's client got "nats: expected 'PONG', got
		// 'PING'" (daemon/node TestAttackWorkloadForgesStartAnswer). Without the short
		// one the first PING comes at PingInterval (2 min unless set).
		DisableShortFirstPing: true,
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

// connectTimeout bounds a connection's handshake (the caller's nats.Timeout wins).
// nats.go's default, 2 s, is too short for a -race test on a loaded 2-core host: at
// load 16, daemon/node TestAttackNexletForgesIntoNodeWatcher's new client did not have
// the server's answer to its CONNECT within it.
const connectTimeout = 30 * time.Second

// authTimeout is how long the server waits for a new client's CONNECT before it closes
// the connection; the server's own default, 2 s, is the server-side twin of
// connectTimeout: at load 43, daemon/node TestAttackNexletForgesIntoNodeWatcher's client
// wrote its CONNECT into a connection the server had already closed ("write: broken
// pipe").
const authTimeout = 30 * time.Second

// Connect opens a client connection to s, closed when the test ends.
func Connect(t testing.TB, s *server.Server, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL(), append([]nats.Option{nats.Timeout(connectTimeout)}, opts...)...)
	if err != nil {
		t.Fatalf("testnats: connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Cluster is n nats-servers routed to each other as one JetStream cluster over
// loopback, each with its own store directory for the whole test. The route ports are
// fixed beforehand (testkit.StablePort), so a server can be started late at the
// address the others expect; client ports are :0, read back from Servers.
type Cluster struct {
	t       testing.TB
	Name    string
	ports   []int
	dirs    []string
	Servers []*server.Server // Servers[i] is nil until Start(i)
}

// NewCluster prepares a cluster of n servers without starting any: Start them one by
// one.
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	c := &Cluster{t: t, Name: "testnats", Servers: make([]*server.Server, n)}
	for range n {
		c.ports = append(c.ports, testkit.StablePort(t))
		c.dirs = append(c.dirs, t.TempDir())
	}
	return c
}

// Start starts server i, routed to all the others.
func (c *Cluster) Start(i int) *server.Server {
	c.t.Helper()
	var routes []*url.URL
	for j, p := range c.ports {
		if j != i {
			routes = append(routes, &url.URL{Scheme: "nats", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(p))})
		}
	}
	c.Servers[i] = Start(c.t, Options{Configure: func(o *server.Options) {
		o.ServerName = fmt.Sprintf("%s-%d", c.Name, i)
		o.StoreDir = c.dirs[i]
		o.Cluster.Name = c.Name
		o.Cluster.Host = "127.0.0.1"
		o.Cluster.Port = c.ports[i]
		o.Routes = routes
	}})
	return c.Servers[i]
}

// URLs is the client URLs of the servers running now, comma-separated.
func (c *Cluster) URLs() string {
	var urls []string
	for _, s := range c.Servers {
		if s != nil {
			urls = append(urls, s.ClientURL())
		}
	}
	return strings.Join(urls, ",")
}

// WaitJetStreamPeers waits until a running server is the JetStream meta leader and
// knows n JetStream peers that are online and have sent their stats (what placing a
// stream with n replicas needs).
func (c *Cluster) WaitJetStreamPeers(n int) {
	c.t.Helper()
	testkit.Eventually(c.t, fmt.Sprintf("a JetStream meta leader with %d peers", n), func() bool {
		for _, s := range c.Servers {
			if s != nil && s.JetStreamIsLeader() && len(s.JetStreamClusterPeers()) >= n {
				return true
			}
		}
		return false
	})
}

// RefusedForControlLine calls connect, which makes one client connection to s, and
// reports whether s closed a client connection for exceeding its max_control_line
// meanwhile, as the server recorded it (Connz of closed connections, saved by a
// goroutine of the server's, so waited for up to 10 s), and connect's error. The
// client's error cannot tell: the server answers a CONNECT line past the bound with
// -ERR 'Maximum Control Line Exceeded' and closes with the rest of the line unread, so
// the reset can reach the client before it writes its PING, whose write then fails
// with "connection reset by peer" and the -ERR is never read (26 of 40 runs of
// TestWorkloadNamespaceBound under -race on a loaded host).
func RefusedForControlLine(t testing.TB, s *server.Server, connect func() error) (bool, error) {
	t.Helper()
	refusals := func() int {
		cz, err := s.Connz(&server.ConnzOptions{State: server.ConnClosed, Limit: 1 << 20})
		if err != nil {
			t.Fatalf("testnats: closed connections: %v", err)
		}
		n := 0
		for _, c := range cz.Conns {
			if c.Reason == server.MaxControlLineExceeded.String() {
				n++
			}
		}
		return n
	}
	before := refusals()
	err := connect()
	if err == nil {
		return false, nil
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if refusals() > before {
			return true, err
		}
		if time.Now().After(deadline) {
			return false, err
		}
	}
}
