package e2e

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestStopWithNATSGone: the node's external NATS server stops answering (a proxy in
// front of it black-holes the link: nothing closes, nothing answers, as with a
// SIGSTOPped server or a cut-off host) and nexd gets SIGTERM with live_restore and
// workloads in KV, one of them logging (feed batches on the native nexlet's local
// channel, each acknowledged only after a NATS flush). nexd exits within its stop
// bound, says what it gave up on, and the next nexd (NATS back) adopts both workloads,
// same processes: none lost, none restarted. Before the fix the channel's close waited
// for each queued batch's 5 s flush: 42 s, nothing logged about it.
func TestStopWithNATSGone(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	c := startNATSGoneCase(t, nodeOpts{extra: []string{"--live-restore", "--state", "kv"}})
	n := c.n
	c.p.Blackhole()
	time.Sleep(2 * time.Second) // the chatty workload's batches queue behind flushes that cannot end
	// The NATS drain's own bound is 10 s; the rest must not wait on NATS.
	took := n.termWithin(t, 25*time.Second, "with NATS gone")
	t.Logf("exit %v after SIGTERM", took)
	if n.err != nil {
		t.Fatalf("nexd: %v\n%s", n.err, n.out.String())
	}
	if out := n.out.String(); !strings.Contains(out, "gave up flushing the nexlet's feed batches") &&
		!strings.Contains(out, "NATS drain did not finish in time") {
		t.Errorf("nothing logged about what the stop gave up on:\n%s", out)
	}

	// NATS back: the next nexd adopts both.
	n2, lost, restarted := c.adoptAfterNATSBack(t, c.o)
	t.Logf("workloads: %d kept, %d lost, %d restarted", len(c.ids)-lost-restarted, lost, restarted)
	if lost+restarted > 0 {
		t.Errorf("%d lost, %d restarted across the stop", lost, restarted)
	}
	n2.signal(t, syscall.SIGTERM)
	n2.wait(t, 60*time.Second)
}

// natsGoneCase is a node on an external NATS server behind a proxy the test can
// black-hole (p), running a quiet and a logging workload.
type natsGoneCase struct {
	n      *node
	o      nodeOpts // the node's, with its state dir and cgroup root: the next nexd's
	p      *testkit.LagProxy
	ln     net.Listener // p's
	addr   string       // the NATS server's
	ids    []string
	before map[string][]int // each workload's processes once running
}

// startNATSGoneCase starts a natsGoneCase's node with o (its NATS and state dir set
// here) and its workloads; it skips without a writable cgroup root.
func startNATSGoneCase(t *testing.T, o nodeOpts) *natsGoneCase {
	t.Helper()
	s := testnats.Start(t, testnats.Options{})
	c := &natsGoneCase{addr: strings.TrimPrefix(s.ClientURL(), "nats://"), before: map[string][]int{}}
	// Outside the ephemeral range (testkit.StablePort): the proxy is put back on this
	// address later, and a port 0 one was taken meanwhile by another test's outgoing
	// connection at load 50 ("bind: address already in use").
	var err error
	if c.ln, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", testkit.StablePort(t))); err != nil {
		t.Fatal(err)
	}
	c.p = testkit.StartLagProxy(t, c.ln, func() (net.Conn, error) { return net.Dial("tcp", c.addr) }, testkit.Lag{})
	o.external, o.stateDir = "nats://"+c.ln.Addr().String(), t.TempDir()
	c.n = startNode(t, o)
	c.n.waitReady(t)
	if c.n.cgroup == "" {
		t.Skip("needs a writable cgroup root to find each workload's processes")
	}
	o.cgroup = c.n.cgroup
	c.o = o
	c.ids = []string{
		c.n.runWorkload(t, "--name", "quiet", "--", "/bin/sleep", "600").ID,
		c.n.runWorkload(t, "--name", "chatty", "--", "/bin/sh", "-c", "while :; do echo tick; sleep 0.02; done").ID,
	}
	testkit.EventuallyWithin(t, 30*time.Second, "both workloads run", func() bool {
		for _, id := range c.ids {
			if c.before[id] = c.n.groupProcs(id); len(c.before[id]) == 0 {
				return false
			}
		}
		return true
	})
	return c
}

// adoptAfterNATSBack puts NATS back behind a new proxy on the black-holed one's
// address (a nexlet left running knows only that one), starts the next nexd with o and,
// once it lists every workload, counts those it did not keep: gone (lost), or without
// its first process (restarted).
func (c *natsGoneCase) adoptAfterNATSBack(t *testing.T, o nodeOpts) (n2 *node, lost, restarted int) {
	t.Helper()
	c.p.Close()
	ln2, err := net.Listen("tcp", c.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	testkit.StartLagProxy(t, ln2, func() (net.Conn, error) { return net.Dial("tcp", c.addr) }, testkit.Lag{})
	n2 = startNode(t, o)
	n2.waitReady(t)
	testkit.EventuallyWithin(t, 60*time.Second, "the next nexd lists every workload", func() bool {
		out, _, code := n2.ctl(t, "workload", "list")
		return code == 0 && !slices.ContainsFunc(c.ids, func(id string) bool { return !strings.Contains(out, id) })
	})
	for _, id := range c.ids {
		now := n2.groupProcs(id)
		switch {
		case len(now) == 0:
			lost++
		case !slices.Contains(now, slices.Min(c.before[id])): // the workload's first process (a shell's)
			restarted++
		}
	}
	return n2, lost, restarted
}
