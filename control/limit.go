package control

import (
	"context"
	"net"
	"sync"
	"time"
)

// Connection limits: a local user who may connect (status) must not be able to pin
// the socket. Admins (root, nexd's own uid, group nex) are only held to the total.
const (
	// MaxConnsPerUser bounds the open connections of one non-admin uid.
	MaxConnsPerUser = 16
	// MaxConns bounds all open connections.
	MaxConns = 1024
	// ReadTimeout bounds reading one request, body included (a slow body).
	ReadTimeout = 15 * time.Second
)

// limitListener admits connections within the limits and tags each with its peer.
type limitListener struct {
	net.Listener
	s *Server

	mu    sync.Mutex
	total int
	per   map[uint32]int
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		p := readPeer(c, l.s.opts.ProcRoot)
		admin := p.Err == nil && l.s.isAdmin(p)
		l.mu.Lock()
		if l.total >= l.s.maxConns || (!admin && l.per[p.UID] >= l.s.maxPerUser) {
			l.mu.Unlock()
			l.s.log.Warn("control connection refused: too many open connections", "uid", p.UID, "pid", p.PID)
			c.Close()
			continue
		}
		l.total++
		l.per[p.UID]++
		l.mu.Unlock()
		return &peerConn{Conn: c, peer: p, l: l}, nil
	}
}

// drain waits until every admitted connection has closed; false when ctx ended first.
func (l *limitListener) drain(ctx context.Context) bool {
	wait := time.Millisecond
	for {
		l.mu.Lock()
		open := l.total
		l.mu.Unlock()
		if open == 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(wait):
		}
		wait = min(2*wait, 50*time.Millisecond)
	}
}

func (l *limitListener) release(uid uint32) {
	l.mu.Lock()
	l.total--
	if l.per[uid]--; l.per[uid] <= 0 {
		delete(l.per, uid)
	}
	l.mu.Unlock()
}

// peerConn is an admitted connection with the credentials its peer had at connect().
type peerConn struct {
	net.Conn
	peer Peer
	l    *limitListener
	once sync.Once
}

func (c *peerConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.peer.UID) })
	return err
}
