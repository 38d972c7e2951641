package nexlet

import (
	"net"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Socket is the TCP connection to a nexlet's first NATS server, opened while the
// nexlet builds itself and registers on its local channel (SocketAhead): its
// connection with the credentials the registration returns then starts with the
// server's INFO already read in, and skips the dial and the server's accept on the
// serial way from the registration's reply to the first heartbeat, which nexd's READY
// waits for (docs/performance-notes.md, Ready).
type Socket struct {
	done chan struct{} // closed once the dial ended
	mu   sync.Mutex
	conn net.Conn  // the dialled connection until taken or closed
	at   time.Time // when the dial ended
	used bool      // taken by a connect
	shut bool      // Close ran: nothing is handed out any more
}

// socketFresh bounds the age of a socket a connect takes. A server closes an
// unauthenticated connection after its auth_timeout (2 s by default, configurable
// lower); a registration that took longer connects on a socket dialled then.
const socketFresh = 250 * time.Millisecond

// socketDialTimeout bounds the dial ahead: on loopback or a LAN it takes well under a
// millisecond, and a connect that finds it still under way waits for it.
const socketDialTimeout = time.Second

// SocketAhead dials the first of servers (nats:// or tls:// URLs, or host:port) in the
// background. Nothing is dialled for a websocket URL or no server; a dial that fails
// is forgotten (the connect dials itself). Hand it to the runner with
// WithConnectSocket, and Close it when the nexlet ends.
func SocketAhead(servers []string) *Socket {
	s := &Socket{done: make(chan struct{})}
	addr, ok := dialAddress(servers)
	if !ok {
		close(s.done)
		return s
	}
	go func() {
		defer close(s.done)
		c, err := net.DialTimeout("tcp", addr, socketDialTimeout)
		if err != nil {
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.shut {
			c.Close()
			return
		}
		s.conn, s.at = c, time.Now()
	}()
	return s
}

// dialAddress is the host:port nats.go dials for the first of servers.
func dialAddress(servers []string) (string, bool) {
	if len(servers) == 0 {
		return "", false
	}
	first := strings.TrimSpace(servers[0])
	if !strings.Contains(first, "://") {
		first = "nats://" + first
	}
	u, err := url.Parse(first)
	if err != nil || u.Hostname() == "" || (u.Scheme != "nats" && u.Scheme != "tls") {
		return "", false
	}
	port := u.Port()
	if port == "" {
		port = "4222" // nats.go's default
	}
	return net.JoinHostPort(u.Hostname(), port), true
}

// take hands out the socket, once, when it is connected to addr (nats.go's dial
// address: an IP and port) and fresh; nil otherwise. A socket it does not hand out is
// closed: nothing takes it later.
func (s *Socket) take(addr string) net.Conn {
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.conn
	if c == nil {
		return nil
	}
	s.conn = nil
	if c.RemoteAddr().String() != addr || time.Since(s.at) > socketFresh {
		c.Close()
		return nil
	}
	s.used = true
	return c
}

// Used says whether a connect took the socket.
func (s *Socket) Used() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.used
}

// Close waits for the dial and closes the socket unless a connect took it.
func (s *Socket) Close() {
	if s == nil {
		return
	}
	s.mu.Lock()
	s.shut = true
	s.mu.Unlock()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.conn.Close()
		s.conn = nil
	}
}

// socketDialer is the connect's dialer: the socket opened ahead for its first dial to
// that address, a fresh dial for any other (another server, a reconnect).
type socketDialer struct {
	s       *Socket
	timeout time.Duration
}

func (d socketDialer) Dial(network, addr string) (net.Conn, error) {
	if network == "tcp" {
		if c := d.s.take(addr); c != nil {
			return c, nil
		}
	}
	return (&net.Dialer{Timeout: d.timeout}).Dial(network, addr)
}
