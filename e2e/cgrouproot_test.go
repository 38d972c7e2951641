package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestCleanStopRemovesOwnCgroupRoot: a node that detected its cgroup root (nexd/<node
// id> on this cgroup v1 host) keeps it over a live_restore stop (its workload runs on
// in it) and removes it, in every hierarchy, on a stop that stops everything: stopped
// nodes used to leave one empty root each (benchmarks left hundreds).
func TestCleanStopRemovesOwnCgroupRoot(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if cgroupRoot(t) == "" {
		t.Skip("needs writable cgroup v1 hierarchies (root)")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	hiers := []string{"memory", "cpu", "pids"}
	var id string
	t.Cleanup(func() { // after the nodes stopped (cleanups run last-in first-out)
		if id == "" {
			return
		}
		for _, h := range hiers {
			root := filepath.Join("/sys/fs/cgroup", h, "nexd", id)
			for i := 0; i < 20 && killTree(root) > 0; i++ {
				time.Sleep(50 * time.Millisecond)
			}
			removeTree(root)
		}
	})
	opts := func(live bool) nodeOpts {
		o := nodeOpts{external: s.ClientURL(), stateDir: state, autoCgroup: true, extra: []string{"--state", "kv"}}
		if live {
			o.extra = append(o.extra, "--live-restore")
		}
		return o
	}
	n := startNode(t, opts(true))
	id = n.waitReady(t).NodeID
	w := n.runWorkload(t, "--name", "keep", "--", "/bin/sleep", "600")
	procs := filepath.Join("/sys/fs/cgroup/memory/nexd", id, "workloads", w.ID, "cgroup.procs")
	testkit.EventuallyWithin(t, 60*time.Second, "the workload runs in the node's own root", func() bool {
		b, _ := os.ReadFile(procs)
		return len(b) > 0
	})
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	if b, err := os.ReadFile(procs); err != nil || len(b) == 0 {
		t.Fatalf("a live_restore stop took the workload's group or process: %q %v", b, err)
	}

	// The same node without live_restore: it adopts the workload, and its stop ends it
	// and removes the root.
	n2 := startNode(t, opts(false))
	if got := n2.waitReady(t).NodeID; got != id {
		t.Fatalf("node id %s after the restart, want %s", got, id)
	}
	n2.signal(t, syscall.SIGTERM)
	if code := n2.wait(t, 120*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	for _, h := range hiers {
		root := filepath.Join("/sys/fs/cgroup", h, "nexd", id)
		if _, err := os.Stat(root); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a clean stop left the node's cgroup root %s: %v", root, err)
		}
	}
}
