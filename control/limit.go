package control

import (
	"context"
	"net"
	"sync"
	"time"
)

// Connection limits: a local user who may connect (status) must not be able to pin
// the socket, nor, with the uids of many workloads (one each), crowd out the admins or
// the other local users: admins (root, nexd's own uid, group nex), workloads' dynamic
// uids and other local users are each bounded apart.
const (
	// MaxConnsPerUser bounds the open connections of one non-admin uid.
	MaxConnsPerUser = 16
	// MaxConns bounds the open connections of each class together: admins, workloads'
	// dynamic uids, other local users.
	MaxConns = 1024
	// ReadTimeout bounds reading one request, body included (a slow body), and, for a
	// non-admin, writing each piece of an answer (a client that never reads).
	ReadTimeout = 15 * time.Second
	// MaxHeaderBytes bounds a request's headers (nexctl sends a few hundred bytes;
	// net/http allows 4 KiB more).
	MaxHeaderBytes = 16 << 10
	// MaxLists bounds the workload lists (GET /v1/workloads, admins only) the socket
	// answers at once; the others wait their turn. Each asks every nexlet for its whole
	// list and holds the rows until they are written: up to MaxConns admin connections
	// held that many lists at once.
	MaxLists = 4
)

// limitListener admits connections within the limits and tags each with its peer.
type limitListener struct {
	net.Listener
	s *Server

	mu    sync.Mutex
	class [numClasses]int // open connections by class
	per   map[uint32]int  // non-admins' connections by uid
}

// A connection's class: each has its own bound of MaxConns.
type connClass int

const (
	classAdmin    connClass = iota
	classWorkload           // a uid in ServerOptions.WorkloadUIDs
	classOther              // any other local user
	numClasses
)

func (l *limitListener) classOf(p Peer) connClass {
	switch {
	case p.Err == nil && l.s.isAdmin(p):
		return classAdmin
	case l.s.isWorkloadUID(p.UID):
		return classWorkload
	}
	return classOther
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		p := readPeer(c, l.s.opts.ProcRoot)
		class := l.classOf(p)
		admin := class == classAdmin
		l.mu.Lock()
		if l.class[class] >= l.s.maxConns || (!admin && l.per[p.UID] >= l.s.maxPerUser) {
			l.mu.Unlock()
			l.s.log.Warn("control connection refused: too many open connections", "uid", p.UID, "pid", p.PID, "workload_uid", class == classWorkload)
			c.Close()
			continue
		}
		l.class[class]++
		if !admin {
			l.per[p.UID]++
		}
		l.mu.Unlock()
		return &peerConn{Conn: c, peer: p, class: class, write: l.s.readTimeout, l: l}, nil
	}
}

// drain waits until every admitted connection has closed; false when ctx ended first.
func (l *limitListener) drain(ctx context.Context) bool {
	wait := time.Millisecond
	for {
		l.mu.Lock()
		open := 0
		for _, n := range l.class {
			open += n
		}
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

func (l *limitListener) release(c *peerConn) {
	l.mu.Lock()
	l.class[c.class]--
	if c.class != classAdmin {
		if l.per[c.peer.UID]--; l.per[c.peer.UID] <= 0 {
			delete(l.per, c.peer.UID)
		}
	}
	l.mu.Unlock()
}

// peerConn is an admitted connection with the credentials its peer had at connect().
type peerConn struct {
	net.Conn
	peer  Peer
	class connClass
	write time.Duration // a non-admin's bound on each write
	l     *limitListener
	once  sync.Once
}

// Write bounds a non-admin's writes: net/http sets no write deadline (a server-wide
// one would end admins' log follows), so a client that sent requests and never read
// the answers held its connection for good. An admin's follow may wait on its reader.
func (c *peerConn) Write(b []byte) (int, error) {
	if c.class != classAdmin {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(c.write))
	}
	return c.Conn.Write(b)
}

func (c *peerConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c) })
	return err
}
