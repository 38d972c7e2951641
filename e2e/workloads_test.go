package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

type runResult struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Node string `json:"node"`
}

func (n *node) runWorkload(t testing.TB, args ...string) runResult {
	t.Helper()
	n.waitNative(t)
	out := n.mustCtl(t, append([]string{"--json", "workload", "run"}, args...)...)
	var r runResult
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.ID == "" {
		t.Fatalf("workload run --json: %v: %q", err, out)
	}
	return r
}

// runWorkloads starts count workloads through nexctl, four at a time as several
// users would; args(i) gives the `workload run` arguments of the i-th. A deploy the
// node refused because its state store did not answer in time (JetStream starved at
// CI's load 50-70: "the node's state store is unavailable") started nothing and is
// sent again, up to storeRetries times.
func (n *node) runWorkloads(t *testing.T, count int, args func(i int) []string) []runResult {
	t.Helper()
	n.waitNative(t)
	bin, dir := nexctlBin(t), t.TempDir()
	res := make([]runResult, count)
	errs := make([]error, count)
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for i := range count {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			full := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
			full = append(full, append([]string{"--json", "workload", "run"}, args(i)...)...)
			out, errOut, code, err := runIn(dir, nil, bin, full...)
			for try := 1; err == nil && code == 1 && strings.Contains(errOut, "state store is unavailable") && try < storeRetries; try++ {
				time.Sleep(2 * time.Second)
				out, errOut, code, err = runIn(dir, nil, bin, full...)
			}
			switch {
			case err != nil:
				errs[i] = err
			case code != 0:
				errs[i] = fmt.Errorf("nexctl %v: exit %d\nstdout: %s\nstderr: %s", full, code, out, errOut)
			default:
				if err := json.Unmarshal([]byte(out), &res[i]); err != nil || res[i].ID == "" {
					errs[i] = fmt.Errorf("workload run --json: %v: %q", err, out)
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return res
}

// storeRetries bounds runWorkloads' sends of one deploy refused for its store.
const storeRetries = 5

// workloads is `nexctl --json workloads`: the node's whole list. A partial list (exit 1,
// "the list is partial": a nexlet missed the node's 2 s fan-out, as one replaying 100
// workloads after a restart may at load 20) is asked for again, for up to
// wholeListWait; then the test fails with the last answer. The tests of the partial
// answer itself (TestLocalListPartial) call n.ctl and assert it.
func (n *node) workloads(t *testing.T) []control.Workload {
	t.Helper()
	deadline := time.Now().Add(wholeListWait)
	for {
		out, errOut, code := n.ctl(t, "--json", "workloads")
		if code == 1 && strings.Contains(errOut, "the list is partial") && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		if code != 0 {
			t.Fatalf("nexctl --json workloads: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
		}
		var ws []control.Workload
		if err := json.Unmarshal([]byte(out), &ws); err != nil {
			t.Fatal(err)
		}
		return ws
	}
}

// wholeListWait bounds how long n.workloads asks again for a partial list.
const wholeListWait = 30 * time.Second

// flush makes sure the server has nc's subscriptions before another connection
// (nexd, nexctl) publishes what they are to catch.
func flush(t *testing.T, nc *nats.Conn) {
	t.Helper()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestWorkloadLifecycle: run (short form, sealed env), list, info, logs, clone, stop,
// and a job's exit code, all through the real nexctl against a real nexd.
func TestWorkloadLifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"}})
	st := n.waitReady(t)
	nc := testnats.Connect(t, s)

	// The workload proves it runs by answering on NATS with its env.
	script := filepath.Join(testkit.PublicDir(t), "svc.sh") // workloads run as dynamic uids
	testkit.WriteFile(t, script, "#!/bin/sh\necho \"hello from $NEX_WORKLOAD_ID secret=$SECRET\"\nexec sleep 600\n")
	os.Chmod(script, 0o755)
	logs, _ := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	flush(t, nc)
	r := n.runWorkload(t, "--name", "svc", "--env", "SECRET=s3cr3t", "--", script)
	if r.Node != st.NodeID {
		t.Fatalf("placed on %q, want %q", r.Node, st.NodeID)
	}
	msg, err := logs.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatal("no log line from the workload:", err)
	}
	if got := string(msg.Data); !strings.Contains(got, "hello from "+r.ID+" secret=s3cr3t") {
		t.Fatalf("workload output %q: env not delivered", got)
	}

	// The sealed environment never appears in clear text in KV or in the clone request.
	kv := testnats.StateBucket(t, nc, st.NodeID)
	entry, err := kv.Get(t.Context(), "native."+r.ID)
	if err != nil {
		t.Fatal("workload not in KV:", err)
	}
	if strings.Contains(string(entry.Value()), "s3cr3t") {
		t.Fatal("KV holds the environment in clear text")
	}
	info := n.mustCtl(t, "workload", "info", r.ID)
	if !strings.Contains(info, "svc") || strings.Contains(info, "s3cr3t") {
		t.Fatalf("workload info:\n%s", info)
	}
	list := n.mustCtl(t, "workload", "list")
	if !strings.Contains(list, r.ID) || !strings.Contains(list, "running") {
		t.Fatalf("workload list:\n%s", list)
	}
	if ws := n.workloads(t); len(ws) != 1 || ws[0].ID != r.ID {
		t.Fatalf("local workloads %+v", ws)
	}
	metrics := n.mustCtl(t, "metrics")
	for _, want := range []string{`nexd_deploys_total{outcome="ok"} 1`, "nexd_auction_seconds_count",
		`nexd_workloads_running{namespace="system",type="native"} 1`, "nexd_state_workloads_stored_total 1"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	// Clone: a second copy with a new id; the original keeps running.
	out := n.mustCtl(t, "--json", "workload", "clone", r.ID)
	var clone runResult
	json.Unmarshal([]byte(out), &clone)
	if clone.ID == "" || clone.ID == r.ID {
		t.Fatalf("clone: %s", out)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "two workloads", func() bool { return len(n.workloads(t)) == 2 })

	// Stop both; a second stop of the same id is answered as already stopped, exit 0
	// (4b0f55d; TestRepeatStopAlreadyStopped covers the answer's shapes).
	n.mustCtl(t, "workload", "stop", r.ID)
	n.mustCtl(t, "workload", "stop", clone.ID)
	if out, errOut, code := n.ctl(t, "workload", "stop", r.ID); code != 0 || !strings.Contains(out, "Workload "+r.ID+" already stopped at ") {
		t.Fatalf("stopping a stopped workload: exit %d, want 0 and 'already stopped at':\n%s%s", code, out, errOut)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "no workloads", func() bool { return len(n.workloads(t)) == 0 })
	if _, err := kv.Get(t.Context(), "native."+r.ID); err == nil {
		t.Fatal("stopped workload still in KV")
	}

	// A job's exit code reaches WORKLOADSTOPPED and the job is not kept in state.
	events, _ := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	flush(t, nc)
	job := n.runWorkload(t, "--name", "job", "--lifecycle", "job", "--", "/bin/sh", "-c", "exit 7")
	var ev protocol.WorkloadStoppedEvent
	testkit.EventuallyWithin(t, 30*time.Second, "WORKLOADSTOPPED for the job", func() bool {
		m, err := events.NextMsg(time.Second)
		if err != nil {
			return false
		}
		json.Unmarshal(m.Data, &ev)
		return ev.ID == job.ID
	})
	if ev.Error == nil || ev.Error.Code != "7" {
		t.Fatalf("job stopped event %+v, want exit code 7", ev)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "finished job removed from KV", func() bool {
		_, err := kv.Get(t.Context(), "native."+job.ID)
		return err != nil
	})
}

// TestLocalEndpoints exercises every control-socket command through nexctl.
func TestLocalEndpoints(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	st := n.waitReady(t)
	// Ready means registered; healthy follows with the nexlet's first heartbeat.
	st = waitStatus(t, n.proc, n.socket, testkit.DefaultWait, "native nexlet healthy", func(st control.Status) bool {
		return len(st.Nexlets) == 1 && st.Nexlets[0].Health == protocol.HealthHealthy
	})
	if st.Cgroup.Mode == "" {
		t.Fatalf("status %+v", st)
	}
	if out := n.mustCtl(t, "status"); !strings.Contains(out, st.NodeID) || !strings.Contains(out, "native") {
		t.Fatalf("status table:\n%s", out)
	}
	if out := n.mustCtl(t, "nexlets"); !strings.Contains(out, "healthy") {
		t.Fatalf("nexlets:\n%s", out)
	}
	if out := n.mustCtl(t, "config"); !strings.Contains(out, "state_dir") {
		t.Fatalf("config:\n%s", out)
	}
	if out := n.mustCtl(t, "logs", "-n", "50"); !strings.Contains(out, "nex node ready") {
		t.Fatalf("logs:\n%s", out)
	}
	if out := n.mustCtl(t, "logs", "--nexlet", "native"); !strings.Contains(out, "native nexlet starting") {
		t.Fatalf("logs --nexlet native:\n%s", out)
	}
	if out := n.mustCtl(t, "metrics"); !strings.Contains(out, "nexd_reloads_total") && !strings.Contains(out, "nexd_nats_reconnects_total") {
		t.Fatalf("metrics:\n%s", out)
	}
	if out := n.mustCtl(t, "reload"); !strings.Contains(strings.ToLower(out), "reload") {
		t.Fatalf("reload: %s", out)
	}
	n.mustCtl(t, "secret", "set", "--insecure-argv", "system", "TOKEN", "v1")
	if out := n.mustCtl(t, "secret", "list", "system"); !strings.Contains(out, "TOKEN") {
		t.Fatalf("secret list: %s", out)
	}
	// A secret:// reference resolves in the workload's environment.
	nc := testnats.Connect(t, s)
	logs, _ := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	flush(t, nc)
	n.runWorkload(t, "--name", "sec", "--lifecycle", "job", "--plain-env", "--env", "TOKEN=secret://TOKEN",
		"--", "/bin/sh", "-c", "echo token=$TOKEN")
	m, err := logs.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatal("no output from the secret job:", err)
	}
	if !strings.Contains(string(m.Data), "token=v1") {
		t.Fatalf("secret not resolved: %q", m.Data)
	}
	n.mustCtl(t, "secret", "rm", "system", "TOKEN")
	if _, _, code := n.ctl(t, "secret", "rm", "system", "TOKEN"); code != 1 {
		t.Fatalf("removing a missing secret: exit %d", code)
	}
	if _, _, code := n.ctl(t, "nexlet", "restart", "nope"); code != 1 {
		t.Fatalf("restart of unknown nexlet: exit %d", code)
	}
	n.mustCtl(t, "nexlet", "restart", "native")

	// Lame duck: the node stops bidding at once and exits after the delay.
	// The checks below must run before the delay ends and the node exits: 3 s was too
	// short for two nexctl runs at load 20 (node list found no node, as it had gone).
	out := n.mustCtl(t, "lameduck", "--delay", "20s")
	if !strings.Contains(out, "stop") {
		t.Fatalf("lameduck: %s", out)
	}
	list := n.mustCtl(t, "node", "list")
	if !strings.Contains(list, st.NodeID+"*") {
		t.Fatalf("node list does not mark the lame duck:\n%s", list)
	}
	_, errOut, code := n.ctl(t, "workload", "run", "--name", "late", "--", "/bin/sleep", "60")
	if code == 0 {
		t.Fatal("a lame duck node accepted a workload")
	}
	_ = errOut
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit after lame duck: %d", code)
	}
}

// TestReplayAfterKill: with --state kv, kill -9 of nexd and a restart with the same
// identity bring every service workload back exactly once, with its old id.
func TestReplayAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const count = 50
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv"}})
	st := n.waitReady(t)
	marker := fmt.Sprintf("nexd-e2e-replay-%d", time.Now().UnixNano())
	ids := map[string]bool{}
	for _, r := range n.runWorkloads(t, count, func(i int) []string {
		return []string{"--bids", "1", "--name", fmt.Sprintf("w%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	}) {
		ids[r.ID] = true
	}
	testkit.EventuallyWithin(t, 60*time.Second, "all workloads running", func() bool { return countProcs(marker) == count })

	n.cmd.Process.Signal(syscall.SIGKILL)
	n.wait(t, 30*time.Second)

	// Same identity and the same cgroup root, as a systemd restart would have.
	n2 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	if st2 := n2.waitReady(t); st2.NodeID != st.NodeID {
		t.Fatalf("identity changed: %s -> %s", st.NodeID, st2.NodeID)
	}
	testkit.EventuallyWithin(t, 90*time.Second, "workloads replayed", func() bool {
		ws := n2.workloads(t)
		if len(ws) != count {
			return false
		}
		for _, w := range ws {
			if !ids[w.ID] {
				t.Fatalf("replayed workload with a new id %s", w.ID)
			}
		}
		return true
	})
	// Exactly once: the old processes died with the old nexlet's cgroup, one new each.
	testkit.EventuallyWithin(t, 30*time.Second, "exactly one process per workload", func() bool { return countProcs(marker) == count })
	time.Sleep(2 * time.Second)
	if c := countProcs(marker); c != count {
		t.Fatalf("%d processes for %d workloads", c, count)
	}
	n2.signal(t, syscall.SIGTERM)
	n2.wait(t, 90*time.Second)
	if c := countProcs(marker); c != 0 {
		t.Fatalf("%d workload processes survived the stop", c)
	}
}

// countProcs counts live processes whose command line contains marker.
func countProcs(marker string) int {
	entries, _ := os.ReadDir("/proc")
	c := 0
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(string(b), marker) {
			// Skip zombies: they are gone as far as the user is concerned.
			if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
				if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) > 0 && f[0] == "Z" {
					continue
				}
			}
			c++
		}
	}
	return c
}

var _ = nats.DefaultURL

// TestReloadedLevelReachesNativeNexlet: the native nexlet logs at nexd's level, and a
// reload that lowers it reaches the nexlet's own lines: its "workload started" of a
// deploy after the reload comes through (at warn it wrote none).
func TestReloadedLevelReachesNativeNexlet(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	cfgPath := filepath.Join(t.TempDir(), "config.json")
	testkit.WriteFile(t, cfgPath, `{"logger": {"level": "warn"}}`)
	n := startNode(t, nodeOpts{extra: []string{"--config", cfgPath}})
	n.waitReady(t)
	before := n.runWorkload(t, "--name", "before", "--", "/bin/sleep", "600")
	testkit.WriteFile(t, cfgPath, `{"logger": {"level": "info"}}`)
	n.signal(t, syscall.SIGHUP)
	waitOut(t, n, "configuration reloaded", 30*time.Second)
	after := n.runWorkload(t, "--name", "after", "--", "/bin/sleep", "600")
	line := waitOut(t, n, `workload started.*`+after.ID, 30*time.Second)
	if !strings.Contains(line, "nexlet=native") {
		t.Fatalf("the nexlet's line %q is not tagged as the native nexlet's", line)
	}
	if regexp.MustCompile(`workload started.*` + before.ID).MatchString(n.out.String()) {
		t.Fatalf("the nexlet logged below nexd's level (warn) before the reload:\n%.4000s", n.out.String())
	}
}

// waitOut waits for a line of nexd's output matching pattern and returns it.
func waitOut(t *testing.T, n *node, pattern string, timeout time.Duration) string {
	t.Helper()
	re := regexp.MustCompile(pattern)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, l := range strings.Split(n.out.String(), "\n") {
			if re.MatchString(l) {
				return l
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("no line of nexd's output matches %q within %s:\n%.4000s", pattern, timeout, n.out.String())
	return ""
}

// echoNode starts a node on s with an echo nexlet (supervised as echo-nexlet,
// registered as echo-a) beside the native one, both registered; it returns the node
// and its id.
func echoNode(t *testing.T, s *server.Server) (*node, string) {
	t.Helper()
	bin := echoNexlet(t)
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{
		"--agents.uri", "file://" + bin, "--agents.argv", "--name", "--agents.argv", "echo-a"}})
	id := n.waitReady(t).NodeID
	n.waitNative(t)
	return n, id
}

// freezeEcho stops the node's echo nexlet with SIGSTOP, as a busy one would miss the
// node's fan-out, until the test ends (or it is sent SIGCONT). It returns once every
// thread of it is stopped: kill returns when the signal is queued and wakes one
// thread, which stops the others when it next runs; on a loaded machine the rest
// answered a fan-out sent right after (TestShutdownReportsPartialList listed the echo
// workload, 1 of 5 runs under -race with other packages).
func (n *node) freezeEcho(t *testing.T) control.Nexlet {
	t.Helper()
	echo := n.nexlet(t, "echo-nexlet")
	if err := syscall.Kill(echo.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(echo.PID, syscall.SIGCONT) })
	testkit.EventuallyWithin(t, 10*time.Second, "every thread of the echo nexlet stopped", func() bool { return allStopped(echo.PID) })
	return echo
}

// allStopped reports whether every thread of process pid is in the stopped state (T).
func allStopped(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		i := strings.LastIndexByte(string(b), ')')
		if err != nil || i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}

// TestWorkloadListPartial: a node whose nexlet misses its 2 s fan-out (here frozen with
// SIGSTOP, as a busy or restarting one would be) marks its WPING answer partial
// (HeaderPartial, naming the nexlet; the body is upstream's array), and nexctl prints the
// rows it got, warns naming the node and the nexlet, and exits 1. Before, the answer
// was short with no sign of it, and nexctl exited 0 with the native row alone. Last,
// the harness's n.workloads asks a partial list again until it is whole.
func TestWorkloadListPartial(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n, _ := echoNode(t, s)
	w := n.runWorkload(t, "--name", "sleeper", "--", "/bin/sleep", "600")
	n.mustCtl(t, "workload", "run", "--type", "echo", "--name", "echoer", "--start-request", `{"message":"hi","interval":"30s"}`)
	if out := n.mustCtl(t, "workload", "list"); !strings.Contains(out, "sleeper") || !strings.Contains(out, "echoer") {
		t.Fatalf("list before: %q", out)
	}
	echo := n.freezeEcho(t)

	out, errOut, code := n.ctl(t, "workload", "list")
	if code != 1 || !strings.Contains(out, "sleeper") || strings.Contains(out, "echoer") {
		t.Fatalf("list with echo-a frozen: exit %d, %q %q; want the native row and exit 1", code, out, errOut)
	}
	want := "nexlet echo-a (" + echo.AgentID + "): no answer within 2s"
	if !strings.Contains(errOut, "warning: node e2e (") || !strings.Contains(errOut, want) || !strings.Contains(errOut, "the list is partial") {
		t.Fatalf("list with echo-a frozen: stderr %q, want a warning naming the node and %q", errOut, want)
	}
	out, errOut, code = n.ctl(t, "--json", "workload", "list")
	var rows []protocol.WorkloadSummary
	if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 1 || rows[0].ID != w.ID || code != 1 ||
		!strings.Contains(errOut, `{"warning":"node e2e (`) {
		t.Fatalf("list --json with echo-a frozen: exit %d, %q %q (%v)", code, out, errOut, err)
	}

	// An upstream client: the reply is the array it decodes; the header is extra.
	nc := testnats.Connect(t, s)
	body, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})
	m, err := nc.Request(protocol.WPingSubject(protocol.SystemNamespace), body, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var list []protocol.WorkloadSummary
	if err := json.Unmarshal(m.Data, &list); err != nil || len(list) != 1 {
		t.Fatalf("WPING reply %s: %v", m.Data, err)
	}
	var p protocol.PartialList
	if err := json.Unmarshal([]byte(m.Header.Get(protocol.HeaderPartial)), &p); err != nil || p.NodeName != "e2e" || p.Wait != "2s" ||
		len(p.Missing) != 1 || p.Missing[0].ID != echo.AgentID || p.Missing[0].Name != "echo-a" || p.Missing[0].Maybe {
		t.Fatalf("%s header %q: %+v %v", protocol.HeaderPartial, m.Header.Get(protocol.HeaderPartial), p, err)
	}

	if err := syscall.Kill(echo.PID, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "a whole list once echo-a answers again", func() bool {
		out, errOut, code := n.ctl(t, "workload", "list")
		return code == 0 && errOut == "" && strings.Contains(out, "sleeper") && strings.Contains(out, "echoer")
	})

	// The harness's n.workloads stands for the whole list: with echo-a frozen again and
	// thawed 3 s later, it asks again past the partial answers and returns both rows
	// (before, it failed the test on the first partial answer's exit 1).
	echo = n.freezeEcho(t)
	thaw := time.AfterFunc(3*time.Second, func() { _ = syscall.Kill(echo.PID, syscall.SIGCONT) })
	defer thaw.Stop()
	if ws := n.workloads(t); len(ws) != 2 {
		t.Fatalf("n.workloads with echo-a thawed after 3 s: %+v, want sleeper and echoer", ws)
	}
}

// TestLocalListPartial: the local commands say when the node's list is partial (its
// echo nexlet frozen with SIGSTOP misses the node's 2 s fan-out). `nexctl workloads`
// prints the native row, warns naming echo-a and exits 1; `nexctl top` and `top --node`
// mark their figures PARTIAL and exit 1; `nexctl lameduck --wait` does not report the
// node drained while the list is partial (the native workload gone, echo-a's still
// there) and ends once echo-a answers again. Before, workloads and top exited 0 with the
// native row alone, and lameduck --wait reported "drained" with echo-a's workload live.
func TestLocalListPartial(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n, id := echoNode(t, s)
	n.runWorkload(t, "--name", "sleeper", "--", "/bin/sleep", "600")
	n.mustCtl(t, "workload", "run", "--type", "echo", "--name", "echoer", "--start-request", `{"message":"hi","interval":"30s"}`)
	if out := n.mustCtl(t, "workloads"); !strings.Contains(out, "sleeper") || !strings.Contains(out, "echoer") {
		t.Fatalf("workloads before: %q", out)
	}
	echo := n.freezeEcho(t)
	missing := "nexlet echo-a (" + echo.AgentID + "): no answer within 2s"

	out, errOut, code := n.ctl(t, "workloads")
	if code != 1 || !strings.Contains(out, "sleeper") || strings.Contains(out, "echoer") ||
		!strings.Contains(errOut, "warning: the node listed only part of its workloads; missing those of "+missing) ||
		!strings.Contains(errOut, "the list is partial") {
		t.Fatalf("workloads with echo-a frozen: exit %d, %q %q; want the native row, a warning naming echo-a, exit 1", code, out, errOut)
	}
	out, errOut, code = n.ctl(t, "--json", "workloads")
	var rows []control.Workload
	if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 1 || rows[0].Name != "sleeper" || code != 1 ||
		!strings.Contains(errOut, `{"warning":"the node listed only part`) {
		t.Fatalf("workloads --json with echo-a frozen: exit %d, %q %q (%v)", code, out, errOut, err)
	}
	for _, args := range [][]string{{"top", "-n", "1", "--interval", "100ms"}, {"top", "--node", id, "-n", "1", "--interval", "100ms"}} {
		out, errOut, code = n.ctl(t, args...)
		if code != 1 || !strings.Contains(out, "sleeper") || !strings.Contains(out, "PARTIAL: ") || !strings.Contains(out, missing) {
			t.Fatalf("%v with echo-a frozen: exit %d, %q %q; want the figures marked PARTIAL naming echo-a, exit 1", args, code, out, errOut)
		}
	}

	// The drain: the native workload stops at 1 s; echo-a's cannot while it is frozen.
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(nexctlBin(t), "--control-socket", n.socket, "lameduck", "--delay", "1s", "--wait")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
	select {
	case err := <-exited:
		exited <- err
		t.Fatalf("lameduck --wait ended while echo-a's workload runs (%v)\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	case <-time.After(10 * time.Second):
	}
	if err := syscall.Kill(echo.PID, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil || !strings.Contains(stdout.String(), "list partial ("+missing+"); waiting") || !strings.Contains(stdout.String(), "drained") {
			t.Fatalf("lameduck --wait once echo-a answers: %v\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("lameduck --wait did not end once echo-a answered\nstdout: %s\nstderr: %s", stdout.String(), stderr.String())
	}
}

// TestShutdownReportsPartialList: nexd stopped (SIGTERM, no live_restore) while its echo
// nexlet is frozen: the shutdown's stop-all stops the native workload, asks the list
// again after its stops, and logs an error naming echo-a, whose workload it could not
// stop. Before, the first partial list was taken as whole and nothing said so.
func TestShutdownReportsPartialList(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n, _ := echoNode(t, s)
	marker := fmt.Sprintf("nexd-e2e-shutdown-partial-%d", time.Now().UnixNano())
	n.runWorkload(t, "--name", "sleeper", "--", "/bin/sh", "-c", "sleep 600; :", marker)
	n.mustCtl(t, "workload", "run", "--type", "echo", "--name", "echoer", "--start-request", `{"message":"hi","interval":"30s"}`)
	testkit.EventuallyWithin(t, 30*time.Second, "the sleeper runs", func() bool { return len(markerPIDs(marker)) > 0 })
	echo := n.freezeEcho(t)
	n.signal(t, syscall.SIGTERM)
	n.wait(t, 60*time.Second)
	if p := markerPIDs(marker); len(p) != 0 {
		t.Errorf("the native workload runs on after the shutdown: %v", p)
	}
	log := n.out.String()
	want := "missing those of nexlet echo-a (" + echo.AgentID + ")"
	if !strings.Contains(log, `msg="stopping workloads at shutdown"`) || !strings.Contains(log, want) {
		t.Errorf("the shutdown's log does not say echo-a's workloads were not stopped (want %q):\n%s", want, log)
	}
}
