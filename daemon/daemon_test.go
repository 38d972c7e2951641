package daemon

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/testkit"
)

// The tests here compare the process's goroutines before and after a run: none of them
// may run in parallel with another.

// inProcess is a nexd run in the test process (what Main does after parsing the
// config), with an embedded NATS server on a free port and no cgroups, so the test can
// see its goroutines.
type inProcess struct {
	d      *daemon
	socket string
	out    *testkit.Buffer
	cancel context.CancelFunc
	done   chan error
}

func startInProcess(t *testing.T, args ...string) *inProcess {
	t.Helper()
	dir := t.TempDir()
	socket := filepath.Join(dir, "nexd.sock")
	args = append([]string{"--state-dir", filepath.Join(dir, "state"), "--control-socket", socket,
		"--embedded-nats-port", "-1", "--disable-native-start", "--logger.target", "std"}, args...)
	loaded, err := config.Load(config.LoadOptions{Args: args, Env: []string{}, Hostname: "inproc"})
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	out := &testkit.Buffer{}
	d, err := newDaemon(loaded, args, out)
	if err != nil {
		t.Fatal(err)
	}
	d.hooks.cgroups = func() *cgroup.Manager { return cgroup.Disabled("in-process test", d.log) }
	ctx, cancel := context.WithCancel(context.Background())
	p := &inProcess{d: d, socket: socket, out: out, cancel: cancel, done: make(chan error, 1)}
	go func() { p.done <- d.run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.done:
		case <-time.After(time.Minute):
			t.Errorf("nexd did not stop")
		}
	})
	return p
}

// stop cancels the daemon's context and returns run's result.
func (p *inProcess) stop(t *testing.T) error {
	t.Helper()
	p.cancel()
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		return err
	case <-time.After(time.Minute):
		t.Fatalf("nexd did not stop within a minute\n%s", p.out.String())
		return nil
	}
}

func (p *inProcess) status(t *testing.T, want control.NodeState) control.Status {
	t.Helper()
	return p.statusWhere(t, string(want), func(st control.Status) bool { return st.State == want })
}

func (p *inProcess) statusWhere(t *testing.T, what string, ok func(control.Status) bool) control.Status {
	t.Helper()
	c := control.NewClient(p.socket)
	defer c.Close()
	var st control.Status
	testkit.Eventually(t, "status "+what, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		cur, err := c.Status(ctx)
		st = cur
		return err == nil && ok(cur)
	})
	return st
}

// goroutineIDs lists the goroutines running now, with their stacks.
func goroutineIDs() map[string]string {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	out := map[string]string{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		if m := regexp.MustCompile(`^goroutine (\d+) `).FindStringSubmatch(g); m != nil {
			out[m[1]] = g
		}
	}
	return out
}

// permanent are goroutines the runtime starts once per process and keeps.
func permanent(stack string) bool {
	return strings.Contains(stack, "os/signal.signal_recv") || strings.Contains(stack, "os/signal.loop")
}

// assertNoneOutlive fails if goroutines started after before are still running (after a
// grace for those that are just returning).
func assertNoneOutlive(t *testing.T, before map[string]string) {
	t.Helper()
	var left []string
	ok := testkit.WaitFor(10*time.Second, func() bool {
		left = left[:0]
		for id, stack := range goroutineIDs() {
			if _, old := before[id]; !old && !permanent(stack) {
				left = append(left, stack)
			}
		}
		return len(left) == 0
	})
	if !ok {
		t.Fatalf("%d goroutines outlived the daemon:\n\n%s", len(left), strings.Join(left, "\n\n"))
	}
}

// TestNoGoroutineOutlivesRun runs a whole node (embedded NATS, node API, control
// socket, metrics listener, a log follow in flight) and stops it: every goroutine it
// started must be gone when run returns, and the closers unwind in reverse.
func TestNoGoroutineOutlivesRun(t *testing.T) {
	before := goroutineIDs()
	p := startInProcess(t, "--metrics-listen", "127.0.0.1:0")
	st := p.status(t, control.StateRunning)
	if st.NodeID == "" || !st.NATS.Embedded || !st.NATS.Connected {
		t.Fatalf("status %+v", st)
	}
	want := []string{"logger", "goroutines", "state_dir lock", "identity", "runtime_dir lock", "control socket", "NATS connection", "revocations", "node API", "nexlets", "metrics listener"}
	if got := p.d.closers.names(); !slices.Equal(got, want) {
		t.Errorf("closer stack %q, want %q", got, want)
	}
	// A log follow holds a goroutine of the daemon's until the socket closes.
	c := control.NewClient(p.socket)
	defer c.Close()
	following := make(chan error, 1)
	go func() {
		following <- c.FollowLogs(context.Background(), control.LogQuery{}, func(control.LogLine) error { return nil })
	}()
	testkit.Eventually(t, "log follow connected", func() bool { return strings.Contains(goroutineDump(), "daemon.followLogs") })

	if err := p.stop(t); err != nil {
		t.Fatalf("run: %v", err)
	}
	<-following
	c.Close()
	if len(p.d.closers.names()) != 0 {
		t.Errorf("closers left: %q", p.d.closers.names())
	}
	if !strings.Contains(p.out.String(), "nexd stopped") {
		t.Errorf("no final log line:\n%s", p.out.String())
	}
	assertNoneOutlive(t, before)
}

func goroutineDump() string {
	var b strings.Builder
	for _, s := range goroutineIDs() {
		b.WriteString(s)
	}
	return b.String()
}

// TestStatusDuringStartup: while a nexlet has not registered the node is built but not
// ready; status says starting (from the snapshot) with the live parts filled in by the
// full API, and a stop then abandons the start cleanly, leaving no goroutine behind.
func TestStatusDuringStartup(t *testing.T) {
	before := goroutineIDs()
	silent := testkit.WriteExecutable(t, filepath.Join(t.TempDir(), "silent-nexlet"), "#!/bin/sh\nexec sleep 120\n")
	p := startInProcess(t, "--agents.uri", silent, "--startup-timeout", "5m")
	st := p.statusWhere(t, "starting with a nexlet", func(st control.Status) bool {
		return st.State == control.StateStarting && len(st.Nexlets) > 0
	})
	if st.NodeID == "" || !st.NATS.Connected || st.Cgroup.Mode != string(cgroup.ModeNone) {
		t.Fatalf("status during start-up %+v", st)
	}
	if len(st.Nexlets) != 1 || st.Nexlets[0].Name != "silent-nexlet" || st.Nexlets[0].PID == 0 {
		t.Fatalf("nexlets during start-up %+v", st.Nexlets)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("a stop during start-up is not a failure: %v", err)
	}
	if !strings.Contains(p.out.String(), "nexlet stopped") {
		t.Errorf("the nexlet was not stopped:\n%s", p.out.String())
	}
	assertNoneOutlive(t, before)
}

// TestStatusWhileWaitingForNATS: long before the node is built (NATS does not answer)
// the socket already answers status, from the snapshot, and refuses what needs the
// node; a stop then ends the wait at once.
func TestStatusWhileWaitingForNATS(t *testing.T) {
	before := goroutineIDs()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "nats://" + l.Addr().String()
	l.Close() // nobody serves NATS there
	p := startInProcess(t, "--nats.servers", dead, "--startup-timeout", "1s")
	st := p.status(t, control.StateStarting)
	if st.NodeID == "" || st.NATS.Connected || len(st.Nexlets) != 0 {
		t.Fatalf("status while waiting for NATS %+v", st)
	}
	testkit.Eventually(t, "status says what nexd waits for", func() bool {
		return strings.Contains(p.status(t, control.StateStarting).Detail, "waiting for NATS (")
	})
	// Past startup_timeout: degraded (READY=1 was sent), still waiting, still answering.
	testkit.Eventually(t, "status says degraded", func() bool {
		return strings.HasPrefix(p.status(t, control.StateStarting).Detail, "degraded: waiting for NATS (")
	})
	c := control.NewClient(p.socket)
	defer c.Close()
	if _, err := c.Lameduck(t.Context(), time.Minute); err == nil || !strings.Contains(err.Error(), "starting") {
		t.Errorf("lame duck while starting: %v, want a refusal saying nexd is starting", err)
	}
	if _, err := c.Config(t.Context()); err != nil {
		t.Errorf("config while starting: %v", err)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("a stop while waiting for NATS is not a failure: %v", err)
	}
	c.Close()
	assertNoneOutlive(t, before)
}

func TestClosersUnwindInReverse(t *testing.T) {
	var c closers
	var got []string
	for _, n := range []string{"a", "b", "c"} {
		c.push(n, func(context.Context) error {
			got = append(got, n)
			if n == "b" {
				return errors.New("b failed")
			}
			return nil
		})
	}
	out := &testkit.Buffer{}
	c.unwind(context.Background(), testLogger(out))
	if !slices.Equal(got, []string{"c", "b", "a"}) {
		t.Errorf("unwound %q, want c, b, a (a failure does not stop the unwinding)", got)
	}
	if !strings.Contains(out.String(), "stopping b") || !strings.Contains(out.String(), "b failed") {
		t.Errorf("failure not logged: %s", out.String())
	}
}

func TestGoroutinesRefusedAfterWait(t *testing.T) {
	var g goroutines
	release := make(chan struct{})
	if !g.goFn(func() { <-release }) {
		t.Fatal("refused before wait")
	}
	if g.wait(10 * time.Millisecond) {
		t.Fatal("wait reported done while a goroutine runs")
	}
	if g.goFn(func() {}) {
		t.Fatal("a goroutine started after wait began")
	}
	close(release)
	if !g.wait(time.Minute) {
		t.Fatal("wait did not see the goroutine end")
	}
}

func testLogger(w *testkit.Buffer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
