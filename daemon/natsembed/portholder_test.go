package natsembed

import (
	"bufio"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/internal/testkit"
)

// squatPerl listens on 127.0.0.1, any free port, prints the port and waits.
const squatPerl = `use IO::Socket::INET; $| = 1;
my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Listen => 5, ReuseAddr => 1) or die "listen: $!";
print $s->sockport, "\n"; sleep 600;`

// TestAttackLocalUserSquatsEmbeddedPort: a local user outside group nex listens on the
// zero-config server's port while no nexd does (127.0.0.1:4222 at boot before nexd, or
// between a restart's two processes; here any free port). nexd cannot start its server
// there, and its error said "if one already runs here, point nexd at it with
// --nats.servers": an operator who did so made her program the node's bus, handed the
// node's requests (workloads' credentials among them) and every client's messages. Now
// the error names her uid as the listener's, says it is no server of the node's and not
// to point nexd at it. A listener of root's own (TestZeroConfigPortInUse) keeps the hint.
func TestAttackLocalUserSquatsEmbeddedPort(t *testing.T) {
	mallory := testkit.NewUser(t)
	squat := mallory.Command("/usr/bin/perl", "-e", squatPerl)
	out, err := squat.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := squat.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = squat.Process.Kill(); _ = squat.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("%s's listener: %q %v", mallory.Name, line, err)
	}
	port, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("%s's listener printed %q", mallory.Name, line)
	}
	_, err = Connect(ctxT(t), natsconn.Options{}, Options{Port: port, StateDir: t.TempDir()}, nil)
	if err == nil {
		t.Fatalf("the embedded server started on 127.0.0.1:%d, where %s listens", port, mallory.Name)
	}
	msg := err.Error()
	if strings.Contains(msg, "point nexd at it with") {
		t.Errorf("the error tells the operator to point nexd at %s's listener: %v", mallory.Name, err)
	}
	if !strings.Contains(msg, "uid "+strconv.FormatUint(uint64(mallory.UID), 10)+" ("+mallory.Name+")") {
		t.Errorf("the error does not name the listener's owner, uid %d (%s): %v", mallory.UID, mallory.Name, err)
	}
}

// TestListenerUIDs reads this process's own listener (root's, or the tester's) back
// from the kernel's tables, at 127.0.0.1 and at any address (tcp6 when the host has it).
func TestListenerUIDs(t *testing.T) {
	for _, c := range []struct{ network, addr, table string }{
		{"tcp4", "127.0.0.1:0", "/proc/net/tcp"},
		{"tcp4", "0.0.0.0:0", "/proc/net/tcp"},
		{"tcp6", "[::]:0", "/proc/net/tcp6"},
	} {
		l, err := net.Listen(c.network, c.addr)
		if err != nil {
			if c.network == "tcp6" {
				continue // no IPv6 here
			}
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		if got := listenerUIDs(c.table, port); len(got) != 1 || got[0] != uint32(os.Geteuid()) {
			t.Errorf("%s: listener uids %v, want [%d]", c.addr, got, os.Geteuid())
		}
		if got := foreignListeners("/proc", port, uint32(os.Geteuid())); len(got) != 0 {
			t.Errorf("%s: own listener taken for another user's: %v", c.addr, got)
		}
		l.Close()
	}
	l, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Skip(err)
	}
	defer l.Close()
	if got := listenerUIDs("/proc/net/tcp", l.Addr().(*net.TCPAddr).Port); len(got) != 0 {
		t.Errorf("127.0.0.2, where 127.0.0.1 can still be bound: listener uids %v, want none", got)
	}
}
