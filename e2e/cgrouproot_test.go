package e2e

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestCleanStopRemovesOwnCgroupRoot: a node that detected its cgroup root (nexd/<node
// id> on this cgroup v1 host) keeps it over a live_restore stop (its workload runs on
// in it) and removes it, in every hierarchy, on a stop that stops everything: stopped
// nodes used to leave one empty root each (benchmarks left hundreds).
func TestCleanStopRemovesOwnCgroupRoot(t *testing.T) {
	needCgroupV1(t, "hierarchies (root)")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	hiers := []string{"memory", "cpu", "pids"}
	var id string
	t.Cleanup(func() { removeNodeRoots(id) }) // after the nodes stopped (cleanups run last-in first-out)
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

// TestAbandonedStartRemovesOwnCgroupRoot: a start abandoned while the native nexlet
// started early (SIGTERM while nexd waits for its NATS server: systemctl stop during an
// outage) removes the node's own cgroup root when nothing runs below it: it left
// nexd/<node id> behind, one for every such stop of a node without a state directory.
// A process below the root (a workload an earlier nexd left for live_restore) keeps it,
// and the process runs on.
func TestAbandonedStartRemovesOwnCgroupRoot(t *testing.T) {
	needCgroupV1(t, "hierarchies (root)")
	t.Parallel()
	// A NATS server that is down: nexd waits for it, its native nexlet started early.
	down := testnats.Start(t, testnats.Options{})
	url := down.ClientURL()
	down.Shutdown()
	down.WaitForShutdown()
	state := t.TempDir()
	hiers := []string{"memory", "cpu", "pids"}
	var id string
	// The node's root in every hierarchy it made one in (cpuacct too, here).
	roots := func() []string { return nodeRoots(id) }
	t.Cleanup(func() { removeNodeRoots(id) }) // after the nodes stopped (cleanups run last-in first-out)
	// start runs nexd until its early native nexlet runs and it waits for NATS.
	start := func() *node {
		ns := newNotifySocket(t)
		n := startNode(t, nodeOpts{external: url, stateDir: state, autoCgroup: true, notify: ns})
		ns.waitFor(t, "waiting for NATS", 60*time.Second)
		testkit.EventuallyWithin(t, 30*time.Second, "the native nexlet started early", func() bool {
			return nexletPID(n.cmd.Process.Pid) != 0
		})
		id = mustStatus(t, n.socket, "nexd waiting for NATS").NodeID
		if len(roots()) < len(hiers) {
			t.Fatalf("the node's cgroup root nexd/%s is not in every hierarchy: %v", id, roots())
		}
		return n
	}
	stop := func(n *node) {
		n.signal(t, syscall.SIGTERM)
		if code := n.wait(t, 60*time.Second); code != 0 {
			t.Fatalf("exit %d after SIGTERM during start-up", code)
		}
	}

	// A process below the root, as a workload an earlier nexd left running: the root
	// and the process stay.
	n := start()
	sleep := exec.Command("/bin/sleep", "600")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = sleep.Wait(); close(waited) }()
	defer func() { _ = sleep.Process.Kill(); <-waited }()
	for _, h := range hiers {
		g := filepath.Join("/sys/fs/cgroup", h, "nexd", id, "workloads", "earlier")
		if err := os.MkdirAll(g, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(g, "cgroup.procs"), []byte(strconv.Itoa(sleep.Process.Pid)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stop(n)
	select {
	case <-waited:
		t.Fatal("the process below the root was killed by a stop during start-up")
	default:
	}
	if got := roots(); len(got) < len(hiers) {
		t.Fatalf("a stop during start-up removed the root a process runs below: left %v", got)
	}

	// Nothing below it: the root goes.
	_ = sleep.Process.Kill()
	<-waited
	n = start()
	stop(n)
	if got := roots(); len(got) > 0 {
		t.Errorf("a stop during start-up left the node's cgroup root: %v\n%s", got, n.out.String())
	}
}

// TestFailedStartRemovesOwnCgroupRoot: a start that fails after the node detected its
// cgroup root (here a configured nexlet binary that does not exist) exits 1 naming the
// problem and leaves no empty nexd/<node id> behind: it left one in every hierarchy.
func TestFailedStartRemovesOwnCgroupRoot(t *testing.T) {
	needCgroupV1(t, "hierarchies (root)")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir, state := t.TempDir(), t.TempDir()
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := kp.Seed()
	id, _ := kp.PublicKey()
	roots := func() []string { return nodeRoots(id) }
	t.Cleanup(func() { removeNodeRoots(id) })
	cfg := `{"node": {"up": {"agents": [{"uri": "file:///nonexistent/nexlet-binary"}]}}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: state, autoCgroup: true, dir: dir,
		env: []string{"NEX_NODE_SEED=" + string(seed)}})
	if code := n.wait(t, 60*time.Second); code != 1 {
		t.Fatalf("exit %d with a nexlet binary that does not exist, want 1:\n%s", code, n.out.String())
	}
	out := n.out.String()
	if !strings.Contains(out, "/nonexistent/nexlet-binary") {
		t.Errorf("the failure does not name the binary:\n%s", out)
	}
	if !strings.Contains(out, "nexd/"+id) {
		t.Fatalf("nexd did not detect its own cgroup root nexd/%s:\n%s", id, out)
	}
	if got := roots(); len(got) > 0 {
		t.Errorf("a failed start left the node's cgroup root: %v", got)
	}
}
