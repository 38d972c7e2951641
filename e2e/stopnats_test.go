package e2e

import (
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
	s := testnats.Start(t, testnats.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(s.ClientURL(), "nats://")
	p := testkit.StartLagProxy(t, ln, func() (net.Conn, error) { return net.Dial("tcp", addr) }, testkit.Lag{})
	extra := []string{"--live-restore", "--state", "kv"}
	n := startNode(t, nodeOpts{external: "nats://" + ln.Addr().String(), extra: extra})
	n.waitReady(t)
	if n.cgroup == "" {
		t.Skip("needs a writable cgroup root to find each workload's processes")
	}
	ids := []string{
		n.runWorkload(t, "--name", "quiet", "--", "/bin/sleep", "600").ID,
		n.runWorkload(t, "--name", "chatty", "--", "/bin/sh", "-c", "while :; do echo tick; sleep 0.02; done").ID,
	}
	before := map[string][]int{}
	testkit.EventuallyWithin(t, 30*time.Second, "both workloads run", func() bool {
		for _, id := range ids {
			if before[id] = n.groupProcs(id); len(before[id]) == 0 {
				return false
			}
		}
		return true
	})

	p.Blackhole()
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

	// NATS back on the same address (the nexlet left running knows only that one): the
	// next nexd adopts both.
	p.Close()
	ln2, err := net.Listen("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	testkit.StartLagProxy(t, ln2, func() (net.Conn, error) { return net.Dial("tcp", addr) }, testkit.Lag{})
	n2 := startNode(t, nodeOpts{external: "nats://" + ln.Addr().String(), stateDir: n.stateDir, cgroup: n.cgroup, extra: extra})
	n2.waitReady(t)
	lost, restarted := 0, 0
	testkit.EventuallyWithin(t, 60*time.Second, "the next nexd lists both workloads", func() bool {
		out, _, code := n2.ctl(t, "workload", "list")
		return code == 0 && strings.Contains(out, ids[0]) && strings.Contains(out, ids[1])
	})
	for _, id := range ids {
		now := n2.groupProcs(id)
		switch {
		case len(now) == 0:
			lost++
		case !slices.Contains(now, slices.Min(before[id])): // the workload's first process (the chatty one's sh)
			restarted++
		}
	}
	t.Logf("workloads: %d kept, %d lost, %d restarted", len(ids)-lost-restarted, lost, restarted)
	if lost+restarted > 0 {
		t.Errorf("%d lost, %d restarted across the stop", lost, restarted)
	}
	n2.signal(t, syscall.SIGTERM)
	n2.wait(t, 60*time.Second)
}
