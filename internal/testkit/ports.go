package testkit

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"testing"
)

// StablePort returns a loopback TCP port that nothing listens on now and that lies
// outside the kernel's ephemeral range (net.ipv4.ip_local_port_range), so no bind to
// port 0 or outgoing connection, by any process, can take it while it is unused.
//
// It is for a server that must come back at the same address after a restart, or
// come up later at an address given beforehand. Everything else binds port 0 and
// reads the address back: "find a free port, close it, hand it on" races with every
// other test that does the same.
func StablePort(t testing.TB) int {
	t.Helper()
	lo, hi := 32768, 60999
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &lo, &hi)
	}
	// Below the range if there is room (the usual case), else above it.
	from, to := 10000, lo-1
	if to-from < 1000 {
		from, to = hi+1, 65535
	}
	if to-from < 100 {
		t.Fatalf("no room outside the ephemeral port range %d-%d", lo, hi)
	}
	for range 100 {
		p := from + rand.IntN(to-from+1)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		return p
	}
	t.Fatalf("no free port in %d-%d after 100 tries", from, to)
	return 0
}

// ActivationSocket listens on a Unix socket at path as systemd does for socket
// activation: closing a server's copy of it (a restart) does not unlink it, and the
// test's own listener, systemd's, is closed when the test ends.
func ActivationSocket(t testing.TB, path string) *net.UnixListener {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	t.Cleanup(func() { l.Close() })
	return l
}
