package testkit

import (
	"io"
	"net"
	"testing"
	"time"
)

// A round trip through the proxy takes at least twice its delay, and bytes arrive
// complete and in order even with every chunk "lost".
func TestLagProxy(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := StartLagProxy(t, ln, func() (net.Conn, error) { return net.Dial("tcp", echo.Addr().String()) },
		Lag{Delay: 50 * time.Millisecond, Loss: 1, RTO: 10 * time.Millisecond})
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	want := "hello through a slow link"
	if _, err := c.Write([]byte(want)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("got %q, %v", got, err)
	}
	if rtt := time.Since(start); rtt < 100*time.Millisecond {
		t.Fatalf("round trip %v through a 50ms-each-way proxy", rtt)
	}
	if chunks, lost := p.Stats(); chunks < 2 || lost != chunks {
		t.Fatalf("stats %d chunks, %d lost; want every chunk counted lost", chunks, lost)
	}
}
