package sysd

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeSystemd is a NOTIFY_SOCKET listener, as systemd opens it.
type fakeSystemd struct {
	t    *testing.T
	conn *net.UnixConn
	name string
}

func listen(t *testing.T, abstract bool) *fakeSystemd {
	t.Helper()
	name := filepath.Join(t.TempDir(), "notify.sock")
	if abstract {
		name = "@nexd-sysd-test-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", name, err)
	}
	t.Cleanup(func() { c.Close() })
	return &fakeSystemd{t: t, conn: c, name: name}
}

// next returns the next datagram, failing the test if none arrives in time.
func (f *fakeSystemd) next() string {
	f.t.Helper()
	msg, ok := f.poll(30 * time.Second)
	if !ok {
		f.t.Fatalf("no datagram on fake NOTIFY_SOCKET")
	}
	return msg
}

func (f *fakeSystemd) poll(wait time.Duration) (string, bool) {
	f.t.Helper()
	buf := make([]byte, 4096)
	f.conn.SetReadDeadline(time.Now().Add(wait))
	n, err := f.conn.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "", false
		}
		f.t.Fatalf("read fake NOTIFY_SOCKET: %v", err)
	}
	return string(buf[:n]), true
}

// notifierWith builds a Notifier under exactly these systemd variables (the rest
// unset), as go-systemd reads them from the process environment.
func notifierWith(t *testing.T, env map[string]string) *Notifier {
	t.Helper()
	for _, k := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
		t.Setenv(k, env[k]) // restored after the test
		if env[k] == "" {
			os.Unsetenv(k)
		}
	}
	return NewNotifier(nil)
}

func monotonicUsec(t *testing.T) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Sec)*1e6 + uint64(ts.Nsec)/1e3
}

func TestNotifierDatagrams(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		t.Run("abstract="+strconv.FormatBool(abstract), func(t *testing.T) {
			sd := listen(t, abstract)
			n := notifierWith(t, map[string]string{"NOTIFY_SOCKET": sd.name})

			cases := []struct {
				name string
				call func() error
				want string
			}{
				{"ready", func() error { return n.Ready("running: 0 workloads") }, "READY=1\nSTATUS=running: 0 workloads"},
				{"ready without status", func() error { return n.Ready("") }, "READY=1"},
				{"status", func() error { return n.Status("nats reconnecting") }, "STATUS=nats reconnecting"},
				{"status newline flattened", func() error { return n.Status("a\nb\n") }, "STATUS=a b"},
				{"stopping", func() error { return n.Stopping("draining") }, "STOPPING=1\nSTATUS=draining"},
				{"extend", func() error { return n.ExtendTimeout(90 * time.Second) }, "EXTEND_TIMEOUT_USEC=90000000"},
			}
			for _, c := range cases {
				if err := c.call(); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if got := sd.next(); got != c.want {
					t.Errorf("%s: datagram %q, want %q", c.name, got, c.want)
				}
			}
		})
	}
}

func TestReloadingCarriesMonotonicUsec(t *testing.T) {
	sd := listen(t, false)
	n := notifierWith(t, map[string]string{"NOTIFY_SOCKET": sd.name})
	before := monotonicUsec(t)
	if err := n.Reloading(); err != nil {
		t.Fatal(err)
	}
	after := monotonicUsec(t)
	got := sd.next()
	lines := strings.Split(got, "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("datagram %q, want RELOADING=1 then MONOTONIC_USEC=", got)
	}
	us, err := strconv.ParseUint(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil {
		t.Fatalf("MONOTONIC_USEC not a number: %q", lines[1])
	}
	if us < before || us > after {
		t.Errorf("MONOTONIC_USEC=%d outside [%d, %d] of CLOCK_MONOTONIC", us, before, after)
	}
}

func TestExtendTimeoutRejectsNonPositive(t *testing.T) {
	n := notifierWith(t, nil)
	if err := n.ExtendTimeout(0); err == nil {
		t.Fatal("ExtendTimeout(0) succeeded, want an error")
	}
}

func TestNoSocketIsNoop(t *testing.T) {
	n := notifierWith(t, map[string]string{"WATCHDOG_USEC": "1000"})
	if n.Enabled() {
		t.Fatal("Enabled without NOTIFY_SOCKET")
	}
	for name, err := range map[string]error{
		"ready":     n.Ready("x"),
		"status":    n.Status("x"),
		"reloading": n.Reloading(),
		"stopping":  n.Stopping("x"),
		"extend":    n.ExtendTimeout(time.Second),
	} {
		if err != nil {
			t.Errorf("%s without NOTIFY_SOCKET: %v", name, err)
		}
	}
	done := make(chan struct{})
	go func() { n.RunWatchdog(context.Background(), func() bool { return true }); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("RunWatchdog without NOTIFY_SOCKET did not return")
	}
	var nilN *Notifier
	if err := nilN.Ready("x"); err != nil {
		t.Errorf("nil notifier: %v", err)
	}
}

func TestBadSocketIsError(t *testing.T) {
	for _, s := range []string{"relative.sock", "vsock:2:1", filepath.Join(t.TempDir(), "missing.sock")} {
		n := notifierWith(t, map[string]string{"NOTIFY_SOCKET": s})
		err := n.Ready("")
		if err == nil || !strings.Contains(err.Error(), s) {
			t.Errorf("NOTIFY_SOCKET=%q: error %v, want one naming the socket", s, err)
		}
	}
}

func TestWatchdogInterval(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	cases := []struct {
		usec, pid string
		want      time.Duration
		ok        bool
	}{
		{"", "", 0, false},
		{"2000000", "", 2 * time.Second, true},
		{"2000000", self, 2 * time.Second, true},
		{"2000000", "1", 0, false},
		{"2000000", "junk", 0, false},
		{"0", "", 0, false},
		{"abc", "", 0, false},
	}
	for _, c := range cases {
		n := notifierWith(t, map[string]string{"WATCHDOG_USEC": c.usec, "WATCHDOG_PID": c.pid})
		got, ok := n.WatchdogInterval()
		if got != c.want || ok != c.ok {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: (%s, %v), want (%s, %v)", c.usec, c.pid, got, ok, c.want, c.ok)
		}
	}
}

// gate is a health check the test flips, counting how often the watchdog asked.
type gate struct {
	mu      sync.Mutex
	healthy bool
	calls   int
}

func (g *gate) check() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.calls++
	return g.healthy
}

func (g *gate) set(h bool) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.healthy = h
	return g.calls
}

func (g *gate) waitCalls(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		g.mu.Lock()
		c := g.calls
		g.mu.Unlock()
		if c >= n {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("health check called fewer than %d times", n)
}

func TestWatchdogPingsOnlyWhileHealthy(t *testing.T) {
	sd := listen(t, false)
	n := notifierWith(t, map[string]string{
		"NOTIFY_SOCKET": sd.name,
		"WATCHDOG_USEC": "40000", // pings every 20ms
		"WATCHDOG_PID":  strconv.Itoa(os.Getpid()),
	})
	g := &gate{healthy: true}
	ctx, cancel := context.WithCancel(context.Background())
	var stopped atomic.Bool
	done := make(chan struct{})
	go func() { n.RunWatchdog(ctx, g.check); stopped.Store(true); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	for i := 0; i < 3; i++ {
		if got := sd.next(); got != "WATCHDOG=1" {
			t.Fatalf("ping %d: %q, want WATCHDOG=1", i, got)
		}
	}

	// Once the check has answered false, every earlier ping is already queued: drain
	// them, let the check fail a few more times, and nothing more may arrive.
	calls := g.set(false)
	g.waitCalls(t, calls+1)
	for {
		if _, ok := sd.poll(10 * time.Millisecond); !ok {
			break
		}
	}
	calls = g.set(false)
	g.waitCalls(t, calls+3)
	if msg, ok := sd.poll(10 * time.Millisecond); ok {
		t.Fatalf("got %q while unhealthy, want no ping", msg)
	}

	g.set(true)
	if got := sd.next(); got != "WATCHDOG=1" {
		t.Fatalf("after recovery: %q, want WATCHDOG=1", got)
	}

	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("RunWatchdog did not return after cancel")
	}
	if !stopped.Load() {
		t.Fatal("watchdog still running")
	}
}

func TestWatchdogForeignPidDoesNotPing(t *testing.T) {
	sd := listen(t, false)
	n := notifierWith(t, map[string]string{
		"NOTIFY_SOCKET": sd.name,
		"WATCHDOG_USEC": "40000",
		"WATCHDOG_PID":  "1",
	})
	done := make(chan struct{})
	go func() { n.RunWatchdog(context.Background(), func() bool { return true }); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("RunWatchdog for another pid did not return")
	}
	if msg, ok := sd.poll(10 * time.Millisecond); ok {
		t.Fatalf("got %q, want nothing for a watchdog meant for pid 1", msg)
	}
}
