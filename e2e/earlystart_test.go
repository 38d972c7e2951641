package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestLiveRestoreStopDuringEarlyStartKeepsWorkloads: with live_restore, nexd and its
// native nexlet are killed (kill -9) and their workload runs on; the next nexd starts
// while the NATS server is down, starts its native nexlet early (before its own connect)
// and is stopped by SIGTERM while it waits for NATS. The workload must still run: it is
// the previous nexd's, left for a nexd that adopts it, and this nexd never got as far
// as knowing it. Stopping the early nexlet must leave the workloads' cgroups alone.
func TestLiveRestoreStopDuringEarlyStartKeepsWorkloads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	srv, acct, sigSeed, creds := operatorNATS(t)
	state := t.TempDir()
	opts := func(cg string, ns *notifySocket) nodeOpts {
		return nodeOpts{external: srv.ClientURL(), stateDir: state, cgroup: cg, notify: ns,
			extra: signingFlags(creds, sigSeed, acct, "--state", "kv", "--live-restore")}
	}
	n := startNode(t, opts("", nil))
	if n.cgroup == "" {
		t.Skip("needs a writable cgroup root (root and cgroup v1 memory) to find each workload's processes")
	}
	n.waitReady(t)
	r := n.runWorkload(t, "--nats.creds-file", creds, "--bids", "1", "--name", "keep", "--", "/bin/sleep", "600")
	var before []int
	testkit.EventuallyWithin(t, 60*time.Second, "the workload runs", func() bool {
		before = n.groupProcs(r.ID)
		return len(before) > 0
	})
	t.Cleanup(func() {
		for _, p := range n.groupProcs(r.ID) {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	})
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	n.cmd.Process.Kill()
	n.wait(t, 30*time.Second)
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the killed nexlet gone", func() bool {
		st := procStatus(nexlet, "State")
		return st == "" || st[0] == 'Z'
	})
	if got := n.groupProcs(r.ID); !slices.Equal(got, before) {
		t.Fatalf("workload processes after kill -9 of nexd and nexlet: %v, before %v", got, before)
	}
	srv.Shutdown()
	srv.WaitForShutdown()

	ns := newNotifySocket(t)
	n2 := startNode(t, opts(n.cgroup, ns))
	ns.waitFor(t, "waiting for NATS", 30*time.Second)
	testkit.EventuallyWithin(t, 30*time.Second, "the native nexlet started early", func() bool {
		return nexletPID(n2.cmd.Process.Pid) != 0
	})
	time.Sleep(time.Second) // its runtime, cgroups and pools set up
	n2.signal(t, syscall.SIGTERM)
	n2.wait(t, 60*time.Second)
	if got := n.groupProcs(r.ID); !slices.Equal(got, before) {
		t.Fatalf("workload processes after a SIGTERM while the next nexd waited for NATS: %v, before %v", got, before)
	}
}

// TestNexletOfAnotherNodeIDNotAdopted: a first start killed (kill -9) after its early
// native nexlet started and before its node id was durable leaves that nexlet running,
// recorded in the state directory, for a node id no seed on disk names; the next nexd
// is another node. It must end that nexlet rather than adopt it (adopted, it registered
// for the old id, READY waited 15 s for it and a new one replaced it) and remove the old
// id's cgroup root. The first nexd here gets its seed from the command line, so that no
// seed reaches the state directory however late the kill comes: the state the window
// leaves. Counted: the old nexlet ended, one native nexlet for the state directory (the
// new nexd's child), no handover, no cgroup root of the old id.
func TestNexletOfAnotherNodeIDNotAdopted(t *testing.T) {
	needCgroupV1(t, "hierarchies (root) for the node's own root nexd/<node id>")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := kp.Seed()
	first, _ := kp.PublicKey()
	var second string
	t.Cleanup(func() { // after the nodes stopped (cleanups run last-in first-out)
		removeNodeRoots(first)
		removeNodeRoots(second)
	})
	records := filepath.Join(state, "nexlets")
	n1 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: state, autoCgroup: true,
		env: []string{"NEX_NODE_SEED=" + string(seed)}})
	var old supervise.Record
	// Recorded is not yet handed its start: the record is written before the hand-off
	// (supervise's handOff), and a pre-started process whose nexd dies before handing it
	// its start reads the pair's close and exits, leaving nothing to adopt. nexd says
	// "nexlet started" once the hand-off was sent.
	testkit.EventuallyWithin(t, 60*time.Second, "the first nexd's native nexlet recorded and handed its start", func() bool {
		var ok bool
		old, ok = supervise.ReadRecord(records, "native")
		return ok && strings.Contains(n1.out.String(), `msg="nexlet started"`)
	})
	n1.cmd.Process.Kill()
	n1.wait(t, 30*time.Second)
	if _, err := os.Stat(filepath.Join(state, "node.seed")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a node seed is on disk (%v): the next nexd would be the same node", err)
	}
	if !old.ID().Alive() {
		t.Fatalf("the first nexd's nexlet %d died with it; nothing to adopt", old.PID)
	}
	if len(nodeRoots(first)) == 0 {
		t.Fatalf("the first nexd made no cgroup root nexd/%s", first)
	}

	n2 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: state, autoCgroup: true})
	second = n2.waitReady(t).NodeID
	if second == first {
		t.Fatalf("the second nexd has the first one's node id %s", first)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the first nexd's nexlet ended", func() bool {
		st := procStatus(old.PID, "State")
		return !old.ID().Alive() || strings.HasPrefix(st, "Z")
	})
	var natives []int
	for _, pid := range allPIDs() {
		if env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid)); strings.Contains(string(env), "NEX_NATIVE_STATE_DIR="+state+"\x00") {
			natives = append(natives, pid)
		}
	}
	if child := nexletPID(n2.cmd.Process.Pid); len(natives) != 1 || natives[0] != child {
		t.Errorf("native nexlets for the state directory: %v; want only the second nexd's child %d", natives, child)
	}
	if got := nodeRoots(first); len(got) > 0 {
		t.Errorf("the first node id's cgroup root is left: %v", got)
	}
	out := n2.out.String()
	if strings.Contains(out, "did not register again") {
		t.Errorf("the second nexd adopted the other node's nexlet and waited for it:\n%s", out)
	}
	if !strings.Contains(out, "not adopted") {
		t.Errorf("the second nexd did not say it ended the other node's nexlet:\n%s", out)
	}
	n2.signal(t, syscall.SIGTERM)
	if code := n2.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
}

// allPIDs lists the processes running now.
func allPIDs() []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, pid)
		}
	}
	return out
}
