// Package localchan is the direct channel between nexd and a nexlet it spawned: one end
// of a Unix socket pair that the nexlet inherits, carrying the start requests a node
// would otherwise send through the NATS server, and their replies. A deploy to such a
// nexlet then crosses NATS only client → node → client, as upstream's in-process agent
// does; heartbeats, stops and every other nexlet stay on NATS. The nexlet's workload
// feeds (logs, metrics, events) come this way too when the node says it takes them
// (EnvFeeds), acknowledged batch by batch (Server.SendFeeds, Client.OnFeed).
//
// Each message is one frame on a stream socket (a start request can be larger than a
// datagram the kernel would take): a 4-byte big-endian length, then a kind byte, an
// 8-byte call id, the subject (2-byte length), the headers (JSON, 4-byte length) and the
// body. A reply (progress report or answer) carries the id of its request, so one
// channel serves many starts at once. The other way, the nexlet calls the node (its
// registration, when the node says it serves calls: EnvCalls), so that the start of the
// node does not wait for a NATS round trip either; and the node tells the nexlet the
// log level a reload set (Client.LogLevel). The pair is made per spawn with SOCK_CLOEXEC, and
// the nexlet marks its end close-on-exec before anything forks, so no other process (a
// workload, another nexlet, a re-executed nexd) ever holds either end. A nexlet that a
// later nexd adopted (live_restore, a re-exec) has no pair with it: it dials that nexd's
// socket (EnvSocket, Dial), which admits only the adopted process (PeerOf), and the
// same protocol runs on that connection.
package localchan

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/peercred"
)

// EnvFD names the environment variable that gives the nexlet the number of its end.
const EnvFD = "NEX_AGENT_LOCAL_FD"

// EnvCalls names the environment variable by which the node says which of the
// nexlet's calls it serves on the channel: CallRegister. A node that does not set it
// (an older nexd) ignores calls, so the nexlet registers over NATS.
const EnvCalls = "NEX_AGENT_LOCAL_CALLS"

// CallRegister is EnvCalls' value for a node that takes the nexlet's registration on
// the channel.
const CallRegister = "register"

// ServesRegistration says whether the node that spawned this nexlet takes its
// registration on the channel (EnvCalls).
func ServesRegistration(env func(string) string) bool { return env(EnvCalls) == CallRegister }

// MaxFrame bounds one message: larger than any NATS payload a node accepts.
const MaxFrame = 128 << 20

const (
	kindRequest byte = 1
	kindReply   byte = 2
	kindServing byte = 3 // the nexlet serves requests from now on
	// A call from the nexlet to the node, and the node's answer (an older node or
	// nexlet ignores both: it reads only the kinds above).
	kindCall      byte = 4
	kindCallReply byte = 5
	// The level nexd logs at from now on (a reload changed it); an older nexlet
	// ignores it.
	kindLogLevel byte = 6
	// A batch of the nexlet's feed messages (logs, metrics, events) for the node to
	// pass on to $NEX.FEED, and the node's acknowledgement of it (same id; the body
	// is an error text when it did not take them). Sent only to a node that said it
	// takes them (EnvFeeds).
	kindFeed    byte = 7
	kindFeedAck byte = 8
)

// EnvFeeds names the environment variable by which the node says ("1") that it takes
// the nexlet's feed messages on the channel (Server.SendFeeds).
const EnvFeeds = "NEX_AGENT_LOCAL_FEEDS"

// TakesFeeds says whether the node that spawned this nexlet takes its feeds on the
// channel (EnvFeeds).
func TakesFeeds(env func(string) string) bool { return env(EnvFeeds) == "1" }

// MaxFeedBatch bounds the bytes of feed batches (their encoding) the nexlet keeps
// unacknowledged, in at most MaxFeedBatches batches: no more than this of feed bytes
// is ever ahead of a start's reply in the socket.
const (
	MaxFeedBatch   = 64 << 10
	MaxFeedBatches = 8
)

// maxQueuedCalls bounds the calls a Client keeps until the node serves them (OnCall):
// a nexlet makes one (its registration); more are answered with an error at once.
const maxQueuedCalls = 4

// ErrClosed is returned for a request on a closed channel.
var ErrClosed = errors.New("local channel closed")

// Pair makes a connected pair: the node's end (kept) and the nexlet's (to inherit, then
// closed in the node). Both are close-on-exec.
func Pair() (node, nexlet *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("local channel: socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "nexlet-local-node"), os.NewFile(uintptr(fds[1]), "nexlet-local-nexlet"), nil
}

// FromEnv takes the nexlet's end named by EnvFD, if any (nil, nil without it). It marks
// the descriptor close-on-exec first (it was inherited without the flag), so call it
// before anything forks. The descriptor must be a Unix stream socket.
func FromEnv(env func(string) string) (*os.File, error) {
	v := env(EnvFD)
	if v == "" {
		return nil, nil
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: want a file descriptor number above 2", EnvFD, v)
	}
	unix.CloseOnExec(fd)
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, fmt.Errorf("%s=%d: not a socket: %w", EnvFD, fd, err)
	}
	if typ != unix.SOCK_STREAM {
		return nil, fmt.Errorf("%s=%d: not a stream socket (type %d)", EnvFD, fd, typ)
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return nil, fmt.Errorf("%s=%d: %w", EnvFD, fd, err)
	}
	if dom != unix.AF_UNIX {
		return nil, fmt.Errorf("%s=%d: not a Unix socket (domain %d)", EnvFD, fd, dom)
	}
	return os.NewFile(uintptr(fd), "nexlet-local"), nil
}

// EnvSocket names the environment variable that gives a native nexlet the path of the
// socket on which a later nexd that adopts it (live_restore, a re-exec) takes its
// channel: such a nexlet has no pair with that nexd, so it dials this (Dial) and speaks
// the same protocol on it. The node admits only the process it adopted (PeerOf).
const EnvSocket = "NEX_AGENT_LOCAL_SOCKET"

// Dial connects to the node's socket at path (EnvSocket), bounded by ctx: the file
// (close-on-exec, for NewServer) and the process listening there.
func Dial(ctx context.Context, path string) (*os.File, Peer, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, Peer{}, fmt.Errorf("local channel: dial %s: %w", path, err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	peer, err := PeerOf(uc)
	if err != nil {
		return nil, Peer{}, err
	}
	f, err := uc.File() // a duplicate, close-on-exec
	if err != nil {
		return nil, Peer{}, fmt.Errorf("local channel: dial %s: %w", path, err)
	}
	return f, peer, nil
}

// Peer is the process at the other end of a Unix socket, as the kernel recorded it at
// connect() or listen() (SO_PEERCRED): no process can make it name another.
type Peer struct {
	PID      int
	UID, GID uint32
}

// PeerOf reads the peer of a connected Unix socket.
func PeerOf(c *net.UnixConn) (Peer, error) {
	cred, err := peercred.Of(c)
	if err != nil {
		return Peer{}, fmt.Errorf("local channel: peer: %w", err)
	}
	return Peer{PID: int(cred.Pid), UID: cred.Uid, GID: cred.Gid}, nil
}

// msg is one frame.
type msg struct {
	kind    byte
	id      uint64
	subject string
	header  nats.Header
	data    []byte
}

// WriteWait bounds a write's wait for its peer to take more of it: a peer that stops
// reading (stuck, stopped) must not hold up its other end's callers; the channel is
// closed instead, and the node goes over NATS (its deploys in flight time out as they
// would there). It bounds each writeChunk, not a whole frame: a peer that reads a
// large frame slowly (a nexlet starved on a loaded host) is not stuck.
const WriteWait = 2 * time.Second

// writeChunk is how much of a frame one write deadline covers.
const writeChunk = 64 << 10

// conn frames messages on a socket; writes are whole frames under wmu. A write that
// fails (its deadline, a closed peer) closes the socket: a frame may be half sent.
type conn struct {
	c         net.Conn
	r         *bufio.Reader
	wmu       sync.Mutex
	writeWait time.Duration
}

func newConn(f *os.File) (*conn, error) {
	c, err := net.FileConn(f) // a duplicate, close-on-exec; f is closed below
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("local channel: %w", err)
	}
	return &conn{c: c, r: bufio.NewReaderSize(c, 64<<10), writeWait: WriteWait}, nil
}

func (c *conn) write(m msg) error {
	var hdr []byte
	if len(m.header) > 0 {
		var err error
		if hdr, err = json.Marshal(m.header); err != nil {
			return fmt.Errorf("local channel: encode headers: %w", err)
		}
	}
	if len(m.subject) > 0xffff {
		return fmt.Errorf("local channel: subject of %d bytes", len(m.subject))
	}
	n := 1 + 8 + 2 + len(m.subject) + 4 + len(hdr) + len(m.data)
	if n > MaxFrame {
		return fmt.Errorf("local channel: message of %d bytes is over %d", n, MaxFrame)
	}
	b := make([]byte, 0, 4+n)
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = append(b, m.kind)
	b = binary.BigEndian.AppendUint64(b, m.id)
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.subject)))
	b = append(b, m.subject...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(hdr)))
	b = append(b, hdr...)
	b = append(b, m.data...)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for len(b) > 0 {
		k := min(len(b), writeChunk)
		if err := c.c.SetWriteDeadline(time.Now().Add(c.writeWait)); err != nil {
			return err
		}
		if _, err := c.c.Write(b[:k]); err != nil {
			c.c.Close()
			return err
		}
		b = b[k:]
	}
	return nil
}

func (c *conn) read() (msg, error) {
	var lb [4]byte
	if _, err := io.ReadFull(c.r, lb[:]); err != nil {
		return msg{}, err
	}
	n := binary.BigEndian.Uint32(lb[:])
	if n < 1+8+2+4 || n > MaxFrame {
		return msg{}, fmt.Errorf("local channel: frame of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		return msg{}, err
	}
	m := msg{kind: b[0], id: binary.BigEndian.Uint64(b[1:9])}
	sl := int(binary.BigEndian.Uint16(b[9:11]))
	b = b[11:]
	if len(b) < sl+4 {
		return msg{}, errors.New("local channel: short frame")
	}
	m.subject, b = string(b[:sl]), b[sl:]
	hl := int(binary.BigEndian.Uint32(b[:4]))
	b = b[4:]
	if len(b) < hl {
		return msg{}, errors.New("local channel: short frame")
	}
	if hl > 0 {
		if err := json.Unmarshal(b[:hl], &m.header); err != nil {
			return msg{}, fmt.Errorf("local channel: headers: %w", err)
		}
	}
	m.data = b[hl:]
	return m, nil
}

// Client is the node's end: it sends requests and delivers each reply to the channel
// of its request, as a NATS channel subscription to a reply inbox would.
type Client struct {
	c    *conn
	done chan struct{} // closed when the reader returned

	mu      sync.Mutex
	next    uint64
	calls   map[uint64]chan<- *nats.Msg
	serving bool // the nexlet said it serves requests
	closed  bool
	onCall  func(*Call)             // nil until OnCall
	queued  []*Call                 // calls that came before OnCall
	onFeed  func([]*nats.Msg) error // nil until OnFeed
	flush   func(context.Context) error
	// stop ends a flush in progress once Close is called: its batch can no longer be
	// acknowledged (the channel is closed), so the nexlet keeps it and sends it again
	// to the next nexd; waiting for NATS would only hold up the stop. cut counts the
	// batches whose flush was so given up (read after Close).
	stop       context.Context
	cancelStop context.CancelFunc
	cut        int // guarded by mu

	// feeds hands the nexlet's feed batches the reader took to feedLoop, which
	// flushes and acknowledges them, so that a flush's round trip never holds up a
	// start's reply behind them; feedDone is closed when feedLoop returned.
	feeds    chan takenFeeds
	feedDone chan struct{}
	// refused is the last feed batch the node refused (0: none): the batches the
	// nexlet sent after it before it saw the refusal (ids up to refused +
	// MaxFeedBatches - 1) are refused too, so that nothing of them is published
	// ahead of the refused one, which the nexlet sends again first (with a later
	// id: Server.FeedRefused). Guarded by mu.
	refused uint64
}

// refusedLocked says whether batch id was sent behind a refused one; else, when
// refuse, it is the refused one from now on. Called with mu held.
func (cl *Client) refusedLocked(id uint64, refuse bool) bool {
	if cl.refused != 0 && id > cl.refused && id-cl.refused < MaxFeedBatches {
		return true
	}
	if refuse {
		cl.refused = id
	}
	return false
}

// NewClient serves the node's end f (taken over: closed with the client).
func NewClient(f *os.File) (*Client, error) {
	c, err := newConn(f)
	if err != nil {
		return nil, err
	}
	cl := &Client{c: c, done: make(chan struct{}), calls: map[uint64]chan<- *nats.Msg{},
		feeds: make(chan takenFeeds, MaxFeedBatches), feedDone: make(chan struct{})}
	cl.stop, cl.cancelStop = context.WithCancel(context.Background())
	go cl.readLoop()
	go cl.feedLoop()
	return cl, nil
}

// Serving reports whether the nexlet said it serves requests and the channel is open:
// until then (a nexlet that does not serve it, or not yet), requests go over NATS.
func (cl *Client) Serving() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.serving && !cl.closed
}

// LogLevel tells the nexlet the level the node logs at from now on (slog's name): it
// logs nothing below it, as it was told at its start.
func (cl *Client) LogLevel(level string) error {
	return cl.c.write(msg{kind: kindLogLevel, data: []byte(level)})
}

// Request sends a request; every reply to it goes to ch (dropped when ch is full, as a
// slow NATS subscriber's would be) until cancel. A reply that never comes (the nexlet
// died) is the caller's timeout, exactly as over NATS.
func (cl *Client) Request(subject string, header nats.Header, data []byte, ch chan<- *nats.Msg) (cancel func(), err error) {
	cl.mu.Lock()
	if cl.closed {
		cl.mu.Unlock()
		return nil, ErrClosed
	}
	cl.next++
	id := cl.next
	cl.calls[id] = ch
	cl.mu.Unlock()
	cancel = func() {
		cl.mu.Lock()
		delete(cl.calls, id)
		cl.mu.Unlock()
	}
	if err := cl.c.write(msg{kind: kindRequest, id: id, subject: subject, header: header, data: data}); err != nil {
		cancel()
		return nil, fmt.Errorf("local channel: send: %w", err)
	}
	return cancel, nil
}

func (cl *Client) readLoop() {
	defer close(cl.done)
	defer close(cl.feeds)
	defer cl.markClosed()
	for {
		m, err := cl.c.read()
		if err != nil {
			return
		}
		if m.kind == kindFeed {
			if len(cl.feeds) == cap(cl.feeds) {
				// The nexlet keeps MaxFeedBatches unacknowledged; more is its
				// error, refused before anything of it is published (only this
				// goroutine sends on feeds, so it has room below).
				_ = cl.c.write(msg{kind: kindFeedAck, id: m.id, data: []byte("local channel: feed batches not acknowledged yet")})
				continue
			}
			cl.mu.Lock()
			take := cl.onFeed
			behind := cl.refusedLocked(m.id, false)
			cl.mu.Unlock()
			batch, err := decodeFeeds(m.data)
			switch {
			case behind:
				err = errors.New("local channel: an earlier feed batch was refused")
			case err == nil && take == nil:
				err = errors.New("local channel: the node does not take feeds yet")
			case err == nil:
				err = take(batch)
			}
			if err != nil && !behind {
				cl.mu.Lock()
				cl.refusedLocked(m.id, true)
				cl.mu.Unlock()
			}
			cl.feeds <- takenFeeds{id: m.id, err: err}
			continue
		}
		if m.kind == kindServing {
			cl.mu.Lock()
			cl.serving = true
			cl.mu.Unlock()
			continue
		}
		if m.kind == kindCall {
			cl.call(&Call{cl: cl, id: m.id, Subject: m.subject, Header: m.header, Data: m.data})
			continue
		}
		if m.kind != kindReply {
			continue
		}
		cl.mu.Lock()
		ch := cl.calls[m.id]
		cl.mu.Unlock()
		if ch == nil {
			continue // cancelled
		}
		select {
		case ch <- &nats.Msg{Header: m.header, Data: m.data}:
		default:
		}
	}
}

// OnFeed makes take the handler of the nexlet's feed batches and flush what makes the
// batches take passed on durable. take passes each message (its subject a $NEX.FEED
// one) on, or drops it; it runs on the channel's reader, so it must not block (publish,
// do not flush), and an error has the nexlet send the batch again later. flush (nil:
// none) runs on the channel's one feed goroutine, after each batch take took and before
// the nexlet is told it was: a kill of the node after the acknowledgement must not lose
// the batch. Batches that come before OnFeed are refused so.
func (cl *Client) OnFeed(take func([]*nats.Msg) error, flush func(context.Context) error) {
	cl.mu.Lock()
	cl.onFeed, cl.flush = take, flush
	cl.mu.Unlock()
}

// takenFeeds is a feed batch the reader handed to take, and what take said.
type takenFeeds struct {
	id  uint64
	err error
}

func (cl *Client) feedLoop() {
	defer close(cl.feedDone)
	for f := range cl.feeds {
		cl.mu.Lock()
		flush := cl.flush
		cl.mu.Unlock()
		err := f.err
		if err == nil && flush != nil {
			if err = flush(cl.stop); err != nil {
				cl.mu.Lock()
				cl.refusedLocked(f.id, true)
				if cl.stop.Err() != nil {
					cl.cut++
				}
				cl.mu.Unlock()
			}
		}
		ack := msg{kind: kindFeedAck, id: f.id}
		if err != nil {
			ack.data = []byte(err.Error())
		}
		_ = cl.c.write(ack)
	}
}

// call hands c to the node's handler, or keeps it until there is one.
func (cl *Client) call(c *Call) {
	cl.mu.Lock()
	h := cl.onCall
	full := false
	if h == nil {
		if full = len(cl.queued) >= maxQueuedCalls; !full {
			cl.queued = append(cl.queued, c)
		}
	}
	cl.mu.Unlock()
	switch {
	case h != nil:
		h(c)
	case full:
		_ = c.Reply(&nats.Msg{Header: nats.Header{micro.ErrorCodeHeader: {"503"},
			micro.ErrorHeader: {fmt.Sprintf("local channel: more than %d calls before the node serves them", maxQueuedCalls)}}})
	}
}

// OnCall makes h the handler of the nexlet's calls, those that came before included.
// h runs on the channel's reader (or, for those that came before, on the caller's
// goroutine): it must not block, and answers with Call.Reply.
func (cl *Client) OnCall(h func(*Call)) {
	cl.mu.Lock()
	cl.onCall = h
	queued := cl.queued
	cl.queued = nil
	cl.mu.Unlock()
	for _, c := range queued {
		h(c)
	}
}

// Call is a call from the nexlet to the node.
type Call struct {
	cl      *Client
	id      uint64
	Subject string
	Header  nats.Header
	Data    []byte
}

// Reply sends the node's answer to the call.
func (c *Call) Reply(m *nats.Msg) error {
	return c.cl.c.write(msg{kind: kindCallReply, id: c.id, header: m.Header, data: m.Data})
}

// CallerGone says whether the nexlet gave up the call: it does so only by closing its
// end (Server.Call, when its context ends), and then goes over NATS. The socket says
// so as soon as that close returned, before the channel's reader may have seen it, so
// a call kept until the node serves is known stale when it is served.
func (c *Call) CallerGone() bool { return c.cl.Gone() }

// Gone says whether the nexlet's end of the channel is closed: it closed it, or its
// process ended (the kernel closes it then), even before the reader has seen it.
func (cl *Client) Gone() bool {
	cl.mu.Lock()
	closed := cl.closed
	cl.mu.Unlock()
	if closed {
		return true
	}
	sc, ok := cl.c.c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	gone := false
	if err := rc.Control(func(fd uintptr) {
		// The peer's close shuts both directions of this end (POLLHUP); a shutdown
		// of its writing side alone (POLLRDHUP) is a caller gone too.
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(fds, 0); err == nil && n > 0 {
			gone = fds[0].Revents&(unix.POLLHUP|unix.POLLRDHUP|unix.POLLERR|unix.POLLNVAL) != 0
		}
	}); err != nil {
		return true // closed meanwhile
	}
	return gone
}

func (cl *Client) markClosed() {
	cl.mu.Lock()
	cl.closed = true
	cl.mu.Unlock()
}

// Close closes the node's end and waits for the reader and the feed goroutine. A
// flush in progress or queued is given up (its context ends): the batch could not be
// acknowledged on the closed channel anyway, and the nexlet sends it again to the
// next node (see Cut).
func (cl *Client) Close() error {
	cl.markClosed()
	cl.cancelStop()
	err := cl.c.c.Close()
	<-cl.done
	<-cl.feedDone
	return err
}

// Cut is how many feed batches Close gave up flushing: the nexlet still holds them
// and sends them again once it has a channel to a node.
func (cl *Client) Cut() int {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.cut
}

// Request is one request on the nexlet's end.
type Request struct {
	s       *Server
	id      uint64
	Subject string
	Header  nats.Header
	Data    []byte
}

// Reply sends one reply (a progress report or the answer) to the request.
func (r *Request) Reply(m *nats.Msg) error {
	return r.s.c.write(msg{kind: kindReply, id: r.id, header: m.Header, data: m.Data})
}

// Server is the nexlet's end.
type Server struct {
	c *conn
	// OnLogLevel, when set (before the channel is read), gets each level the node
	// says it logs at from now on (slog's name, e.g. "WARN").
	OnLogLevel func(level string)
	// OnFeedAck, when set (before Serve), gets the node's acknowledgement of each
	// feed batch (SendFeeds): err nil when the node took it. It runs on Serve's
	// goroutine and must not block.
	OnFeedAck func(id uint64, err error)
	// Before Serve, Call reads the channel itself: the requests it reads meanwhile
	// wait here for Serve, and nextCall numbers its calls.
	early    []*Request
	nextCall uint64
	broken   error // a Call ended mid-frame: the channel is closed
}

// NewServer serves the nexlet's end f (taken over).
func NewServer(f *os.File) (*Server, error) {
	c, err := newConn(f)
	if err != nil {
		return nil, err
	}
	return &Server{c: c}, nil
}

// Announce tells the node that this nexlet serves requests on the channel. Send it
// before registering: the node uses the channel for a registration it accepted after
// reading this, and requests wait in the socket until Serve reads them.
func (s *Server) Announce() error {
	err := s.c.write(msg{kind: kindServing})
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, net.ErrClosed) {
		return nil // the node's end is gone already: NATS it is
	}
	return err
}

// Call sends a call to the node and waits for its answer (or ctx), reading the
// channel itself: make calls before Serve, from one goroutine. A start request that
// comes meanwhile (the node may send one as soon as it accepted a registration) waits
// for Serve. An error other than ctx's means the channel failed (closed with it): the
// nexlet goes over NATS.
func (s *Server) Call(ctx context.Context, subject string, header nats.Header, data []byte) (*nats.Msg, error) {
	if s.broken != nil {
		return nil, s.broken
	}
	s.nextCall++
	id := s.nextCall
	if err := s.c.write(msg{kind: kindCall, id: id, subject: subject, header: header, data: data}); err != nil {
		return nil, fmt.Errorf("local channel: send: %w", err)
	}
	// ctx's end interrupts the read; what was read of a frame is then lost, so the
	// channel is closed. ran says the interruption happened: ctx may end just as the
	// answer arrives, and its deadline must not then end the next Serve at once.
	ran := make(chan struct{})
	stop := context.AfterFunc(ctx, func() { _ = s.c.c.SetReadDeadline(time.Now()); close(ran) })
	answered := func() error {
		if stop() {
			return nil
		}
		<-ran
		return s.c.c.SetReadDeadline(time.Time{})
	}
	defer stop()
	for {
		m, err := s.c.read()
		if err != nil {
			s.c.c.Close()
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			s.broken = fmt.Errorf("local channel: %w", err)
			return nil, s.broken
		}
		switch {
		case m.kind == kindRequest:
			s.early = append(s.early, &Request{s: s, id: m.id, Subject: m.subject, Header: m.header, Data: m.data})
		case m.kind == kindLogLevel:
			s.logLevel(m)
		case m.kind == kindCallReply && m.id == id:
			if err := answered(); err != nil {
				s.c.c.Close()
				s.broken = fmt.Errorf("local channel: clear the read deadline: %w", err)
				return nil, s.broken
			}
			return &nats.Msg{Subject: subject, Header: m.header, Data: m.data}, nil
		}
	}
}

// Serve reads requests and hands each to handle, on the reading goroutine (handle must
// not block), until the node's end closes or StopServing (nil).
func (s *Server) Serve(handle func(*Request)) error {
	early := s.early
	s.early = nil
	for _, r := range early {
		handle(r)
	}
	if s.broken != nil {
		return nil
	}
	for {
		m, err := s.c.read()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			return err
		}
		if m.kind == kindLogLevel {
			s.logLevel(m)
		}
		if m.kind == kindFeedAck && s.OnFeedAck != nil {
			var err error
			if len(m.data) > 0 {
				err = errors.New(string(m.data))
			}
			s.OnFeedAck(m.id, err)
		}
		if m.kind != kindRequest {
			continue
		}
		handle(&Request{s: s, id: m.id, Subject: m.subject, Header: m.header, Data: m.data})
	}
}

func (s *Server) logLevel(m msg) {
	if s.OnLogLevel != nil {
		s.OnLogLevel(string(m.data))
	}
}

// SendFeeds sends a batch of feed messages (each with its $NEX.FEED subject, headers
// and body) under id; the node acknowledges it to OnFeedAck, batches in the order they
// were sent. Keep the unacknowledged batches within MaxFeedBatches and MaxFeedBatch
// bytes (FeedSize) in all, but for a single message.
func (s *Server) SendFeeds(id uint64, batch []*nats.Msg) error {
	return s.c.write(msg{kind: kindFeed, id: id, data: encodeFeeds(batch)})
}

// FeedRefused is the id after which the nexlet numbers its batches once the node
// refused batch id, lastID the last it sent: the node refuses those it sent before it
// saw the refusal (within MaxFeedBatches after id), and takes the re-sent ones.
func FeedRefused(id, lastID uint64) uint64 { return max(lastID, id+MaxFeedBatches-1) }

// FeedSize is what m takes in a feed batch.
func FeedSize(m *nats.Msg) int {
	n := 3*binary.MaxVarintLen32 + len(m.Subject) + len(m.Data)
	for k, vs := range m.Header {
		for _, v := range vs {
			n += 2*binary.MaxVarintLen32 + len(k) + len(v)
		}
	}
	return n
}

// encodeFeeds encodes a batch: per message its subject, its header pairs (a count,
// then key and value each) and its body, each length-prefixed (uvarint).
func encodeFeeds(batch []*nats.Msg) []byte {
	n := 0
	for _, m := range batch {
		n += FeedSize(m)
	}
	b := make([]byte, 0, n)
	str := func(v string) { b = binary.AppendUvarint(b, uint64(len(v))); b = append(b, v...) }
	for _, m := range batch {
		str(m.Subject)
		pairs := 0
		for _, vs := range m.Header {
			pairs += len(vs)
		}
		b = binary.AppendUvarint(b, uint64(pairs))
		for k, vs := range m.Header {
			for _, v := range vs {
				str(k)
				str(v)
			}
		}
		b = binary.AppendUvarint(b, uint64(len(m.Data)))
		b = append(b, m.Data...)
	}
	return b
}

var errBadFeeds = errors.New("local channel: malformed feed batch")

// maxFeedHeaders bounds a feed message's header pairs (the SDK sets a few).
const maxFeedHeaders = 256

// decodeFeeds decodes a batch. Its cost stays a small multiple of its size whatever a
// rogue nexlet claims: a batch over MaxFeedBatch holds one message (the nexlet sends
// more only within it), and a message at most maxFeedHeaders header pairs; before,
// 1 MiB of empty messages or header pairs cost the node 40-145 MB.
func decodeFeeds(b []byte) ([]*nats.Msg, error) {
	single := len(b) > MaxFeedBatch
	next := func() ([]byte, error) {
		l, k := binary.Uvarint(b)
		if k <= 0 || l > uint64(len(b)-k) {
			return nil, errBadFeeds
		}
		v := b[k : k+int(l)]
		b = b[k+int(l):]
		return v, nil
	}
	var out []*nats.Msg
	for len(b) > 0 {
		if single && len(out) == 1 {
			return nil, errBadFeeds
		}
		subj, err := next()
		if err != nil {
			return nil, err
		}
		pairs, k := binary.Uvarint(b)
		if k <= 0 || pairs > maxFeedHeaders {
			return nil, errBadFeeds
		}
		b = b[k:]
		m := &nats.Msg{Subject: string(subj)}
		if pairs > 0 {
			m.Header = make(nats.Header, pairs)
		}
		for range pairs {
			key, err := next()
			if err != nil {
				return nil, err
			}
			val, err := next()
			if err != nil {
				return nil, err
			}
			m.Header[string(key)] = append(m.Header[string(key)], string(val))
		}
		if m.Data, err = next(); err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// StopServing ends Serve (its read returns); replies can still be sent.
func (s *Server) StopServing() error { return s.c.c.SetReadDeadline(time.Now()) }

// Close closes the nexlet's end.
func (s *Server) Close() error { return s.c.c.Close() }
