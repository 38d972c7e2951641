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

// proxyRules say what a dropProxy does to a client's messages (PUB/HPUB), by subject.
// They are fixed when the proxy starts: its connections' goroutines read them, and the
// race detector sees no order between a later assignment and a connection made by
// another process.
type proxyRules struct {
	// drop, when set, leaves out the messages it says to drop: a lossy network.
	drop func(subject string) bool
	// cut, when set, ends a client's connection (both ways) right after the message
	// it says to cut went to the server: the server takes it, and its answer is lost
	// with the connection (the client connects again).
	cut func(subject string) bool
	// hold, when set, holds a client's message whose subject it says to hold (and
	// everything after it on that connection) until releaseHeld: a server slow to
	// answer that one connection.
	hold func(subject string) bool
}

// dropProxy is a TCP proxy in front of a NATS server that applies its rules to the
// client's messages. dropped and held count the messages dropped and held so far.
type dropProxy struct {
	ln       net.Listener
	target   string
	rules    proxyRules
	dropped  atomic.Int64
	held     atomic.Int64
	release  chan struct{}
	released sync.Once
	wg       sync.WaitGroup
}

func startDropProxy(t *testing.T, target string, rules proxyRules) *dropProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &dropProxy{ln: ln, target: strings.TrimPrefix(target, "nats://"), rules: rules, release: make(chan struct{})}
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
		if p.rules.drop != nil && p.rules.drop(f[1]) {
			p.dropped.Add(1)
			continue
		}
		if p.rules.hold != nil && p.rules.hold(f[1]) {
			p.held.Add(1)
			<-p.release
		}
		if _, err := io.WriteString(dst, line); err != nil {
			return
		}
		if _, err := dst.Write(payload); err != nil {
			return
		}
		if p.rules.cut != nil && p.rules.cut(f[1]) {
			return // the caller closes both ends
		}
	}
}
