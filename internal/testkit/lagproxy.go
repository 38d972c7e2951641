package testkit

import (
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// LagProxy is a TCP proxy that makes a link slow and lossy where the kernel has no
// netem: every chunk it forwards is held for Delay in each direction, and with
// probability Loss a chunk is held a retransmission timeout (RTO) longer, which is what
// a lost segment costs a TCP stream such as a NATS connection (bytes are never
// dropped: TCP would resend them). Order is kept.
type LagProxy struct {
	o    Lag
	ln   net.Listener
	dial func() (net.Conn, error)
	wg   sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]bool
	closed bool
	hole   chan struct{} // closed by Blackhole
	end    chan struct{} // closed by Close
	rng    *rand.Rand
	lost   int
	chunks int
}

// Lag is how slow and lossy a LagProxy makes its link.
type Lag struct {
	Delay time.Duration // each direction
	Loss  float64       // 0..1, per chunk
	RTO   time.Duration // extra hold of a "lost" chunk (default 200ms, Linux's minimum RTO)
}

// StartLagProxy forwards every connection accepted on ln to a connection from dial
// until the test ends; the cleanup closes everything and waits for its goroutines.
func StartLagProxy(t testing.TB, ln net.Listener, dial func() (net.Conn, error), o Lag) *LagProxy {
	if o.RTO == 0 {
		o.RTO = 200 * time.Millisecond
	}
	p := &LagProxy{o: o, ln: ln, dial: dial, hole: make(chan struct{}), end: make(chan struct{}),
		conns: map[net.Conn]bool{}, rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// ProxyNATS is a LagProxy without lag on a free loopback port in front of the NATS
// server at serverURL (nats://host:port), and the URL to reach the server through it.
func ProxyNATS(t testing.TB, serverURL string) (*LagProxy, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(serverURL, "nats://")
	p := StartLagProxy(t, ln, func() (net.Conn, error) { return net.Dial("tcp", addr) }, Lag{})
	return p, "nats://" + ln.Addr().String()
}

// Blackhole makes the link a server that stopped answering without closing anything
// (SIGSTOPped, its host cut off): from now on nothing is forwarded or read, every
// connection stays open, and a new one is accepted (the kernel's backlog) and then
// never answered. Only Close ends them.
func (p *LagProxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.hole:
	default:
		close(p.hole)
	}
}

func (p *LagProxy) blackholed() bool {
	select {
	case <-p.hole:
		return true
	default:
		return false
	}
}

// Close stops the proxy and cuts every connection.
func (p *LagProxy) Close() {
	p.mu.Lock()
	if !p.closed {
		close(p.end)
	}
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.ln.Close()
	p.wg.Wait()
}

// Stats returns how many chunks were forwarded and how many of them were "lost".
func (p *LagProxy) Stats() (chunks, lost int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.chunks, p.lost
}

func (p *LagProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns[c] = true
	return true
}

func (p *LagProxy) accept() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		if p.blackholed() {
			if !p.track(in) {
				return
			}
			continue // held open, never answered; Close closes it
		}
		out, err := p.dial()
		if err != nil {
			in.Close()
			continue
		}
		if !p.track(in) || !p.track(out) {
			in.Close()
			out.Close()
			return
		}
		p.wg.Add(2)
		go p.pipe(out, in)
		go p.pipe(in, out)
	}
}

type chunk struct {
	data []byte
	due  time.Time
}

// pipe copies src to dst through a queue of timed chunks; when either side ends,
// both connections are closed.
func (p *LagProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	q := make(chan chunk, 1024)
	var writer sync.WaitGroup
	writer.Go(func() {
		for c := range q {
			time.Sleep(time.Until(c.due))
			if p.blackholed() {
				continue
			}
			if _, err := dst.Write(c.data); err != nil {
				break
			}
		}
		for range q { // drain so the reader never blocks
		}
	})
	var last time.Time
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if p.blackholed() {
			<-p.end // read no more: the sender's buffers fill as a stopped peer's would
			break
		}
		if n > 0 {
			due := time.Now().Add(p.o.Delay)
			p.mu.Lock()
			p.chunks++
			if p.o.Loss > 0 && p.rng.Float64() < p.o.Loss {
				p.lost++
				due = due.Add(p.o.RTO)
			}
			p.mu.Unlock()
			if due.Before(last) {
				due = last // a stalled chunk holds up the ones behind it, as in TCP
			}
			last = due
			q <- chunk{data: append([]byte(nil), buf[:n]...), due: due}
		}
		if err != nil {
			break
		}
	}
	close(q)
	writer.Wait()
	src.Close()
	dst.Close()
}
