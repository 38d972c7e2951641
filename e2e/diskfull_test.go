package e2e

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestEmbeddedStoreDiskFullHeals: the zero-config node keeps its embedded server's
// JetStream store in its state directory, here a small tmpfs, which is filled up while
// six services run. Five are stopped: their removals from the state bucket fail
// (ENOSPC, which nats-server's stream keeps as a write error), some with no room for a
// tombstone either. Once the space is freed, the node must remove them from its state
// and take deploys again without a restart, and a next nexd must run none of them
// again. Before, the store refused every write until nexd restarted.
func TestEmbeddedStoreDiskFullHeals(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	// JetStream reserves the state bucket's 100 MB from 75 % of the free space.
	dir := testkit.SmallFS(t, "160m")
	n := startNode(t, nodeOpts{stateDir: dir, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	cs := startServices(t, n, 6)
	c2 := cs[5]

	fill := testkit.FillFS(t, dir)
	var out, errOut string
	var code int
	for _, c := range cs[:5] {
		out, errOut, code = n.ctl(t, "workload", "stop", c.id)
		t.Logf("stop on a full disk: exit %d: %s%s", code, out, errOut)
		if code != 0 || !strings.Contains(out, "successfully stopped") {
			t.Fatalf("stop: exit %d: %s%s", code, out, errOut)
		}
	}
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	// Those on disk and those kept in memory (no room for the file).
	tombstones := func() int {
		c := control.NewClient(n.socket)
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := c.Status(ctx)
		if err != nil {
			return -1
		}
		return len(st.Tombstones)
	}
	healed := testkit.WaitFor(60*time.Second, func() bool { return tombstones() == 0 })
	t.Logf("removals pending after the space was freed: %d (none left: %v, after %v)", tombstones(), healed, time.Since(freed).Round(time.Second))
	if !healed {
		t.Errorf("the stopped service's removal from node state still pending 60 s after the space was freed: %d tombstone(s)", tombstones())
	}
	full := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
	full = append(full, "--json", "workload", "run", "--name", "afterfree", "--", "/bin/sleep", "600")
	out, errOut, code = run(t, nil, nexctlBin(t), full...)
	if code != 0 {
		t.Errorf("a deploy after the space was freed: exit %d: %s%s", code, out, errOut)
	}
	if r := c2.runs(); r != 1 || len(c2.mains()) != 1 {
		t.Errorf("the other service: %d runs, processes %v; want 1 and 1", r, c2.mains())
	}
	// Every stopped service is out of node state: a next nexd (nexd and its nexlet
	// killed) starts none of them again.
	killNexdAndNexlet(t, n)
	n2 := startNode(t, nodeOpts{stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t)
	time.Sleep(3 * time.Second)
	again := 0
	for _, c := range cs[:5] {
		if c.runs() != 1 || len(c.mains()) != 0 {
			again++
		}
	}
	t.Logf("stopped services started again by the next nexd: %d of 5", again)
	if again != 0 {
		t.Errorf("%d of 5 stopped services ran again after the restart", again)
	}
}

// TestExternalStoreDiskFull: the node's state is on an external nats-server whose
// JetStream store (a small tmpfs) fills up while eight services run. Six are stopped
// and two deploys are made while it is full; nexd and its nexlet are then killed (-9)
// and started again on the full store; then the space is freed and the server
// restarted on its store (nexd cannot restart another server's JetStream), and nexd and
// its nexlet are killed once more. Counted: stopped services that run again, deploys
// answered as started that do not run or are not listed, runs of the services left
// running.
func TestExternalStoreDiskFull(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	store := testkit.SmallFS(t, "160m")
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir = store }})
	port := s.Addr().(*net.TCPAddr).Port
	dir := t.TempDir()
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	cs := startServices(t, n, 8)
	stopped, kept := cs[:6], cs[6:]
	fill := testkit.FillFS(t, store)
	var late []crashLoop
	// deploy runs a service through an auction: "ran", "refused" by the node it went to
	// (503, not started: it bid and then could not record it; said as such, not
	// "internal server error" as before 673826d), or "no bid".
	deploy := func(name string) string {
		c, got := auctionDeploy(t, n, name, "state store (JetStream) did not take the workload's record")
		if got == "ran" {
			late = append(late, c)
		}
		return got
	}
	refused := 0 // deploys until the store refuses one: writes first fill the slack of its files' last pages
	for i := 0; i < 40 && refused == 0; i++ {
		if deploy("late"+strconv.Itoa(i)) == "refused" {
			refused++
		}
	}
	if refused == 0 {
		t.Fatal("no deploy refused on the full store")
	}
	// Once a write failed the node does not bid while its store refuses writes: no
	// deploy goes to it to be refused (before, each won the auction and was refused).
	outcomes := map[string]int{}
	for i := range 5 {
		outcomes[deploy("refused"+strconv.Itoa(i))]++
	}
	t.Logf("5 deploys after the first refusal on the full store: %v", outcomes)
	if outcomes["refused"] != 0 || outcomes["ran"] != 0 {
		t.Errorf("after the store refused a write, %d of 5 deploys went to the node and were refused, %d ran; want none (no bid)", outcomes["refused"], outcomes["ran"])
	}
	if out, errOut, _ := n.ctl(t, "status"); !strings.Contains(out, "state store cannot be written") {
		t.Errorf("nexctl status does not say the auctions not bid on were for the state store: %s%s", out, errOut)
	}
	var pending atomic.Int32
	var wg sync.WaitGroup
	for _, c := range stopped { // at once: each removal waits out its retries
		wg.Go(func() {
			out, errOut, code := n.ctl(t, "workload", "stop", c.id)
			t.Logf("stop on a full store: exit %d: %s%s", code, out, errOut)
			if code != 0 || !strings.Contains(out, "successfully stopped") {
				t.Errorf("stop: exit %d: %s%s", code, out, errOut)
			}
			if strings.Contains(out, "removing it from node state failed") {
				pending.Add(1)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("on the full store: %d deploys started before one was refused (refused: %d), then %d of 6 stops answered with their removal pending", len(late), refused, pending.Load())

	killNexdAndNexlet(t, n)
	n2 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t)
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	s.Shutdown()
	s.WaitForShutdown()
	s = testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = store, port }})
	testkit.EventuallyWithin(t, 60*time.Second, "the removals retried once the server is back", func() bool {
		ents, err := os.ReadDir(filepath.Join(dir, "tombstones"))
		return err == nil && len(ents) == 0 || os.IsNotExist(err)
	})
	// The store takes writes again: the node bids again once its JetStream check says
	// so (a check across the server's restart may have found it unavailable), and the
	// deploy runs.
	testkit.EventuallyWithin(t, 60*time.Second, "the node's state store ok again", func() bool {
		var st control.Status
		out, _, code := n2.ctl(t, "--json", "status")
		return code == 0 && json.Unmarshal([]byte(out), &st) == nil && st.NATS.JetStream != nil && st.NATS.JetStream.State == "ok"
	})
	n = n2
	if got := deploy("after"); got != "ran" {
		t.Errorf("a deploy once the server is back on a store with room: %s, want ran", got)
	}
	killNexdAndNexlet(t, n2)
	n3 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n3.waitReady(t)
	time.Sleep(3 * time.Second)
	again, lost, twice := 0, 0, 0
	for _, c := range stopped {
		if c.runs() != 1 || len(c.mains()) != 0 {
			again++
			t.Logf("stopped %s: %d runs, processes %v", c.id, c.runs(), c.mains())
		}
	}
	for _, c := range append(slices.Clone(kept), late...) {
		_, listed := c.listed(t, n3)
		if !listed || len(c.mains()) != 1 {
			lost++
			t.Logf("running %s: listed %v, processes %v", c.id, listed, c.mains())
		}
		if c.runs() != 1 {
			twice++
			t.Logf("running %s: %d runs", c.id, c.runs())
		}
	}
	t.Logf("after the store filled, both kills and the server's restart: stopped services run again %d of 6; running ones lost or unlisted %d of %d, run again %d",
		again, lost, len(kept)+len(late), twice)
	if again+lost+twice != 0 {
		t.Errorf("work lost or duplicated: %d stopped services ran again, %d running ones lost or unlisted, %d ran twice", again, lost, twice)
	}
}

// startServices starts count services (startLoop, restart policy always) on n and waits
// until each ran once.
func startServices(t *testing.T, n *node, count int) []crashLoop {
	t.Helper()
	var cs []crashLoop
	for range count {
		cs = append(cs, startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3))
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the services run", func() bool {
		for _, c := range cs {
			if c.runs() != 1 {
				return false
			}
		}
		return true
	})
	return cs
}

// TestStateDirFullNoBid: with an external NATS server (whose store has room), the
// node's own state directory is a small tmpfs, filled while four services run. The node
// must stop bidding within about a second (a deploy sent to it would be refused: its
// records cannot be written), keep what it runs, show it in nexctl status, and bid again
// once the space is back. Counted: of 3 deploys while full, how many went to the node
// (0: no bid); running services lost (0). Before, the node kept bidding, won each auction
// and refused the deploy (disk full).
func TestStateDirFullNoBid(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir := testkit.SmallFS(t, "16m")
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	running := startServices(t, n, 4)
	deploy := func(name string) string {
		c, got := auctionDeploy(t, n, name, "disk full")
		if got == "ran" {
			running = append(running, c)
		}
		return got
	}
	fill := testkit.FillFS(t, dir)
	full := time.Now()
	testkit.EventuallyWithin(t, 30*time.Second, "nexctl status says the local state cannot be written", func() bool {
		out, _, _ := n.ctl(t, "status")
		return strings.Contains(out, "UNWRITABLE") && strings.Contains(out, "disk full") // its runtime directory is on it too
	})
	t.Logf("status says so %s after the fill", time.Since(full).Round(time.Millisecond))
	outcomes := map[string]int{}
	for i := range 3 {
		outcomes[deploy("onfull"+strconv.Itoa(i))]++
	}
	t.Logf("3 deploys while the state directory is full: %v", outcomes)
	if outcomes["refused"]+outcomes["ran"] != 0 {
		t.Errorf("%d of 3 deploys went to the node with a full state directory (%d refused, %d ran); want none: no bid", outcomes["refused"]+outcomes["ran"], outcomes["refused"], outcomes["ran"])
	}
	if out, errOut, _ := n.ctl(t, "status"); !strings.Contains(out, "state store cannot be written") {
		t.Errorf("nexctl status does not count the auctions not bid on: %s%s", out, errOut)
	}
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	var got string
	testkit.EventuallyWithin(t, 30*time.Second, "a deploy runs once the space is back", func() bool {
		got = deploy("afterfree")
		return got == "ran"
	})
	t.Logf("a deploy ran %s after the space was freed", time.Since(freed).Round(time.Millisecond))
	lost := 0
	for _, c := range running {
		if _, listed := c.listed(t, n); !listed || len(c.mains()) != 1 || c.runs() != 1 {
			lost++
			t.Logf("running %s: listed %v, processes %v, runs %d", c.id, listed, c.mains(), c.runs())
		}
	}
	t.Logf("running services lost, unlisted or run twice: %d of %d", lost, len(running))
	if lost != 0 {
		t.Errorf("%d running services lost while the state directory was full", lost)
	}
}

// auctionDeploy runs a service through an auction on n's NATS and says how it went:
// "ran", "refused" (by the node it went to, with refusedText), or "no bid".
func auctionDeploy(t *testing.T, n *node, name, refusedText string) (crashLoop, string) {
	t.Helper()
	c := newCrashLoop(t, "auctiondeploy")
	full := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
	full = append(full, "--json", "workload", "run", "--name", name, "--", "/bin/sh", "-c", `echo run >> "$1"; sleep 600`, c.marker, c.runsFile)
	out, errOut, code := run(t, nil, nexctlBin(t), full...)
	var r runResult
	switch {
	case code == 0 && json.Unmarshal([]byte(out), &r) == nil:
		c.id = r.ID
		return c, "ran"
	case c.runs() != 0:
		t.Errorf("deploy %s refused ran: %d runs: %s%s", name, c.runs(), out, errOut)
	case strings.Contains(out+errOut, refusedText):
		return c, "refused"
	case strings.Contains(out+errOut, "no bids for"):
		return c, "no bid"
	default:
		t.Errorf("deploy %s: exit %d: %s%s", name, code, out, errOut)
	}
	return c, "?"
}
