package e2e

import (
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
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
	srv, acct, sigSeed, creds := operatorNATS(t)
	state := t.TempDir()
	opts := func(cg string, ns *notifySocket) nodeOpts {
		return nodeOpts{external: srv.ClientURL(), stateDir: state, cgroup: cg, notify: ns,
			extra: []string{"--nats.creds-file", creds, "--issuer-signing-key", sigSeed,
				"--issuer-signing-key-root-account", acct, "--state", "kv", "--live-restore"}}
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
