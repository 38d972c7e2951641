package e2e

import (
	"bufio"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// dropProxy is a TCP proxy in front of a NATS server that drops the client messages
// (PUB/HPUB) whose subject drop says to drop: a lossy network for chosen messages.
type dropProxy struct {
	ln      net.Listener
	target  string
	drop    func(subject string) bool
	dropped atomic.Int64
	// cut, when set, ends a client's connection (both ways) right after the message
	// it says to cut went to the server: the server takes it, and its answer is lost
	// with the connection (the client connects again).
	cut func(subject string) bool
	// hold, when set, holds a client's message whose subject it says to hold (and
	// everything after it on that connection) until releaseHeld: a server slow to
	// answer that one connection. held counts the messages held so far.
	hold     func(subject string) bool
	held     atomic.Int64
	release  chan struct{}
	released sync.Once
	wg       sync.WaitGroup
}

func startDropProxy(t *testing.T, target string, drop func(subject string) bool) *dropProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &dropProxy{ln: ln, target: strings.TrimPrefix(target, "nats://"), drop: drop, release: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() { p.releaseHeld(); ln.Close(); p.wg.Wait() })
	return p
}

// releaseHeld lets every message held by hold go on, and those after them.
func (p *dropProxy) releaseHeld() { p.released.Do(func() { close(p.release) }) }

func (p *dropProxy) URL() string { return "nats://" + p.ln.Addr().String() }

func (p *dropProxy) accept() {
	defer p.wg.Done()
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		conns.Add(2)
		go func() { defer conns.Done(); io.Copy(c, s); c.Close() }()
		go func() { defer conns.Done(); p.filter(s, c); s.Close() }()
	}
}

// filter copies the client's protocol to the server, line by line, leaving out the
// messages to drop (the control line and its payload).
func (p *dropProxy) filter(dst io.Writer, src io.Reader) {
	r := bufio.NewReaderSize(src, 64<<10)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		f := strings.Fields(line)
		var size int
		if len(f) >= 3 && (strings.EqualFold(f[0], "PUB") || strings.EqualFold(f[0], "HPUB")) {
			size, _ = strconv.Atoi(f[len(f)-1]) // total size (HPUB: headers + payload)
		}
		if size == 0 && !(len(f) >= 3 && (strings.EqualFold(f[0], "PUB") || strings.EqualFold(f[0], "HPUB"))) {
			if _, err := io.WriteString(dst, line); err != nil {
				return
			}
			continue
		}
		payload := make([]byte, size+2) // and \r\n
		if _, err := io.ReadFull(r, payload); err != nil {
			return
		}
		if p.drop(f[1]) {
			p.dropped.Add(1)
			continue
		}
		if p.hold != nil && p.hold(f[1]) {
			p.held.Add(1)
			<-p.release
		}
		if _, err := io.WriteString(dst, line); err != nil {
			return
		}
		if _, err := dst.Write(payload); err != nil {
			return
		}
		if p.cut != nil && p.cut(f[1]) {
			return // the caller closes both ends
		}
	}
}
