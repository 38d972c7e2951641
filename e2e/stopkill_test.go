package e2e

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestAnsweredStopStaysStoppedAcrossKills: a service with a restart policy is
// stopped, and the stop is answered; nexd and its native nexlet are both killed (-9)
// right after the answer, before either cleaned up (held there by NEXD_TEST_HOLD: nexd
// before it forgets the workload, the nexlet before it removes its record). The next
// nexd (same state) must not start the stopped service again: one run in all, none
// running, none listed. Before, the service was still in node state, the next nexd
// replayed it, and the nexlet's policy ran it a second time.
func TestAnsweredStopStaysStoppedAcrossKills(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	hold := testhold.Env + "=" + testhold.StopReplied + "," + testhold.StopTidy
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, env: []string{hold}, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	c := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool { return c.runs() == 1 && len(c.mains()) == 1 })
	out, errOut, code := n.ctl(t, "workload", "stop", c.id)
	if code != 0 || !strings.Contains(out, "successfully stopped") {
		t.Fatalf("stop: exit %d: %s%s", code, out, errOut)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "nexd and the nexlet held after the answer", func() bool {
		log := n.out.String()
		return strings.Contains(log, "hold="+testhold.StopReplied) && strings.Contains(log, "hold="+testhold.StopTidy)
	})
	killNexdAndNexlet(t, n)

	n2 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t) // once the replayed workloads run again
	stoppedOnce(t, c, n2)
}

// TestStopWithStateStoreDownStaysStopped: a service with a restart policy is stopped
// while the node's state store is unreachable (JetStream disabled on the real
// nats-server, core NATS still up, so the stop itself reaches the nexlet), and the
// stop's removal from node state fails for real. nexd and its nexlet are then killed
// (-9), JetStream comes back, and the next nexd starts on the same state: the stopped
// service must not run again. Before, the failed removal was only logged, the record
// stayed in the bucket, and the next nexd replayed the service (a second run). Now a
// tombstone in the state directory keeps it out of the replay, the stop's answer says
// the removal is pending, and the next nexd's retry removes the record and the
// tombstone.
func TestStopWithStateStoreDownStaysStopped(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	var storeDir string
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { storeDir = o.StoreDir }})
	dir := t.TempDir()
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	c := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool { return c.runs() == 1 && len(c.mains()) == 1 })

	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := n.ctl(t, "workload", "stop", c.id)
	if code != 0 || !strings.Contains(out, "successfully stopped") {
		t.Fatalf("stop: exit %d: %s%s", code, out, errOut)
	}
	t.Logf("the stop's answer: %s", out)
	if !strings.Contains(out, "removing it from node state failed") || !strings.Contains(out, "tombstone") {
		t.Errorf("the stop's answer does not say its removal from node state is pending: %s", out)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the service's process gone", func() bool { return len(c.mains()) == 0 })
	killNexdAndNexlet(t, n)
	// JetStream back: the same server's store, read again at a restart (a JetStream
	// enabled again in the same process would not reload the bucket).
	port := s.Addr().(*net.TCPAddr).Port
	s.Shutdown()
	s.WaitForShutdown()
	s = testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = storeDir, port }})

	n2 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t)
	stoppedOnce(t, c, n2)
	testkit.EventuallyWithin(t, 30*time.Second, "the retried removal drops the tombstone", func() bool {
		ents, err := os.ReadDir(filepath.Join(dir, "tombstones"))
		return err == nil && len(ents) == 0
	})
	// Out of the bucket too: a third nexd (without the tombstone) replays nothing.
	n2.signal(t, syscall.SIGKILL)
	n2.wait(t, 30*time.Second)
	n3 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n3.waitReady(t)
	stoppedOnce(t, c, n3)
}

// killNexdAndNexlet kills (-9) n's native nexlet, then n, and waits for n's end.
func killNexdAndNexlet(t *testing.T, n *node) {
	t.Helper()
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n.signal(t, syscall.SIGKILL)
	n.wait(t, 30*time.Second)
}

// stoppedOnce checks, on the next node n2 (ready), that the stopped service c ran once
// in all for 5 s, runs no process and is not listed.
func stoppedOnce(t *testing.T, c crashLoop, n2 *node) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if r := c.runs(); r != 1 {
			t.Fatalf("the stopped service ran again after the restart: %d runs, processes %v", r, c.mains())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if m := c.mains(); len(m) != 0 {
		t.Errorf("processes of the stopped service: %v", m)
	}
	if w, ok := c.listed(t, n2); ok {
		t.Errorf("the stopped service is listed again: %+v", w)
	}
}

// TestStopCutShortByKillsStaysStopped: a service with a restart policy that ignores
// SIGTERM (a 4 s grace) is stopped (`--no-wait`: the node said "stopping"); while it
// waits out its grace, nexd and its native nexlet are both killed (-9). The stop was
// asked for and under way (its SIGTERM went out), so the service must not run on nor
// run again: the next nexlet finishes the stop (the rest of the grace, then a kill),
// and the next nexd removes it from node state. Before, the next nexd replayed it and
// the nexlet adopted the live process: it ran on, listed.
func TestStopCutShortByKillsStaysStopped(t *testing.T) {
	n, dir := startKVNode(t)
	c := newCrashLoop(t, "stopcut")
	script := `echo run >> "$1"; trap 'echo term >> "$1"' TERM; while :; do sleep 0.05; done`
	req, _ := json.Marshal(map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", script, c.marker, c.runsFile},
		"stop_grace": "4s", "restart": map[string]any{"policy": "always", "max": 3}})
	c.id = n.runWorkload(t, "--name", "stopcut", "--lifecycle", "service", "--start-request", string(req)).ID
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool { return c.runs() == 1 && len(c.mains()) == 1 })
	waitTrapped(t, "the service", c.mains)
	out, errOut, code := n.ctl(t, "workload", "stop", "--no-wait", c.id)
	if code != 0 {
		t.Fatalf("stop --no-wait: exit %d: %s%s", code, out, errOut)
	}
	terms := func() int { b, _ := os.ReadFile(c.runsFile); return strings.Count(string(b), "term\n") }
	testkit.EventuallyWithin(t, 30*time.Second, "the SIGTERM reached the service", func() bool { return terms() >= 1 })
	killNexdAndNexlet(t, n)
	if m := c.mains(); len(m) != 1 {
		t.Fatalf("the SIGTERM-deaf service is not running after the kills: %v", m)
	}

	n2 := startNode(t, nodeOpts{stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t)
	// Its grace (4 s from the SIGTERM) is over well within this.
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && len(c.mains()) != 0 {
		time.Sleep(100 * time.Millisecond)
	}
	runningOn := len(c.mains())
	_, listed := c.listed(t, n2)
	t.Logf("after the kills and the next start: %d process(es) of the stopped service running, %d run(s), listed %v", runningOn, c.runs(), listed)
	if runningOn != 0 {
		t.Fatalf("the stopped service runs on after nexd and its nexlet were killed mid-stop: %v (listed: %v)", c.mains(), listed)
	}
	stoppedOnce(t, c, n2)
}

// startKVNode starts a parallel e2e test's node (its own embedded NATS) keeping its
// state in KV, ready, and returns the state directory for the next node after a kill.
func startKVNode(t *testing.T) (*node, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	dir := t.TempDir()
	n := startNode(t, nodeOpts{stateDir: dir, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	return n, dir
}
