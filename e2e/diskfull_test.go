package e2e

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
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
	var cs []crashLoop
	for range 6 {
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
