package nexlet

import (
	"context"
	"encoding/json"
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// answerRegistrations answers the agent's registration over NATS with conn data for
// srv alone, as a node with no credentials does.
func answerRegistrations(t testing.TB, srv *server.Server, nc *nats.Conn) {
	t.Helper()
	_, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) {
		body, _ := json.Marshal(protocol.RegisterAgentResponse{Success: true, NodeID: node,
			ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}})
		_ = m.Respond(body)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// clientPorts are the remote ports of srv's client connections, by connection name
// ("" before a CONNECT).
func clientPorts(t testing.TB, srv *server.Server) map[int]string {
	t.Helper()
	cz, err := srv.Connz(&server.ConnzOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, c := range cz.Conns {
		out[c.Port] = c.Name
	}
	return out
}

// socketPort waits for s's dial and returns its local port (0: none).
func socketPort(s *Socket) int {
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return 0
	}
	return s.conn.LocalAddr().(*net.TCPAddr).Port
}

// waitClients waits until srv counts n client connections.
func waitClients(t testing.TB, srv *server.Server, n int) {
	t.Helper()
	deadline := time.Now().Add(testkit.DefaultWait)
	for srv.NumClients() != n {
		if time.Now().After(deadline) {
			t.Fatalf("server has %d client connections, want %d: %v", srv.NumClients(), n, clientPorts(t, srv))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// socketAheadSetup starts a server whose node answers registrations, and a socket
// dialled ahead to it that counts as fresh for a minute; it returns the server, the
// socket (closed at the test's end) and the socket's local port.
func socketAheadSetup(t *testing.T) (*server.Server, *Socket, int) {
	t.Helper()
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	answerRegistrations(t, srv, testnats.Connect(t, srv))
	sock := SocketAhead([]string{srv.ClientURL()})
	t.Cleanup(sock.Close)
	port := socketPort(sock)
	if port == 0 {
		t.Fatal("no socket dialled ahead")
	}
	// Dialled just now, for a minute: the nexlet's registration round trip before its
	// connect took longer than socketFresh on a loaded host (TestConnectSocketTaken
	// failed so at load 40). The age bound is TestConnectSocketStale's to test.
	sock.mu.Lock()
	sock.at = time.Now().Add(time.Minute)
	sock.mu.Unlock()
	return srv, sock, port
}

// runWithSocket starts a nexlet on srv given sock to connect with, shut down at the
// test's end; err is Run's.
func runWithSocket(t *testing.T, srv *server.Server, sock *Socket) (*Runner, error) {
	t.Helper()
	r, err := NewRunner(context.Background(), node, newMemAgent(), WithConnectSocket(sock))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	return r, nil
}

// TestConnectSocketTaken: the connection with the registration's credentials is the
// socket opened ahead (the server sees the nexlet's named connection on its port) and
// no other connection is left open.
func TestConnectSocketTaken(t *testing.T) {
	srv, sock, port := socketAheadSetup(t)
	if _, err := runWithSocket(t, srv, sock); err != nil {
		t.Fatal(err)
	}
	if !sock.Used() {
		t.Fatal("the connect did not take the socket opened ahead")
	}
	if name := clientPorts(t, srv)[port]; name != "nexlet-mem" {
		t.Errorf("the socket's connection is named %q on the server, want the nexlet's (%v)", name, clientPorts(t, srv))
	}
	sock.Close()
	waitClients(t, srv, 2) // the test's and the nexlet's
}

// TestConnectSocketStale: a socket older than socketFresh is not taken (the server may
// have closed it at its auth_timeout) but closed, and the nexlet connects anew.
func TestConnectSocketStale(t *testing.T) {
	srv, sock, _ := socketAheadSetup(t)
	sock.mu.Lock()
	sock.at = time.Now().Add(-2 * socketFresh)
	sock.mu.Unlock()
	if _, err := runWithSocket(t, srv, sock); err != nil {
		t.Fatal(err)
	}
	if sock.Used() {
		t.Fatal("a stale socket was taken")
	}
	waitClients(t, srv, 2) // the stale socket closed
}

// TestConnectSocketClosedByServer: the server drops the socket opened ahead before the
// connect (as at its auth_timeout): the connect on it fails, and the nexlet connects
// once more, dialled anew, instead of failing its start.
func TestConnectSocketClosedByServer(t *testing.T) {
	srv, sock, port := socketAheadSetup(t)
	waitClients(t, srv, 2) // the test's and the socket's, once the server took it
	cz, err := srv.Connz(&server.ConnzOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kicked := false
	for _, c := range cz.Conns {
		if c.Port == port {
			if err := srv.DisconnectClientByID(c.Cid); err != nil {
				t.Fatal(err)
			}
			kicked = true
		}
	}
	if !kicked {
		t.Fatalf("the server does not list the socket's connection (port %d): %v", port, clientPorts(t, srv))
	}
	waitClients(t, srv, 1)
	r, err := runWithSocket(t, srv, sock)
	if err != nil {
		t.Fatalf("Run after the server closed the socket opened ahead: %v", err)
	}
	if !sock.Used() {
		t.Fatal("the connect did not try the socket opened ahead: nothing tested")
	}
	if !r.NC().IsConnected() {
		t.Fatal("the nexlet is not connected")
	}
	waitClients(t, srv, 2)
}

// TestDialAddress: what SocketAhead dials is what nats.go dials for the first server.
func TestDialAddress(t *testing.T) {
	for _, c := range []struct {
		servers []string
		want    string
	}{
		{[]string{"nats://127.0.0.1:4333", "nats://10.0.0.1:4222"}, "127.0.0.1:4333"},
		{[]string{"127.0.0.1:4333"}, "127.0.0.1:4333"},
		{[]string{"nats://127.0.0.1"}, "127.0.0.1:4222"},
		{[]string{"tls://[::1]:4443"}, "[::1]:4443"},
		{[]string{" nats://localhost "}, "localhost:4222"},
		{[]string{"ws://127.0.0.1:8080"}, ""},
		{[]string{"nats://"}, ""},
		{nil, ""},
	} {
		got, ok := dialAddress(c.servers)
		if got != c.want || ok != (c.want != "") {
			t.Errorf("dialAddress(%q) = %q, %v; want %q", c.servers, got, ok, c.want)
		}
	}
}
