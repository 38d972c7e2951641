package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// groupProcs lists the processes of a workload's own cgroup (workloads/<id> below the
// node's cgroup root, outside every nexlet's group). On cgroup v1 the native nexlet's
// forking thread may still sit in a fresh workload's group for a moment (its fork
// pool): cgroup.procs then lists the nexlet too, which is not the workload's.
func (n *node) groupProcs(id string) []int {
	b, err := os.ReadFile(filepath.Join(n.cgroup, "workloads", id, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		p, err := strconv.Atoi(f)
		if err != nil {
			continue
		}
		if cmd, _ := os.ReadFile(filepath.Join("/proc", f, "cmdline")); strings.Contains(string(cmd), "nexlet\x00native") {
			continue
		}
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// waitTrapped waits until one of the processes procs lists has set its SIGTERM
// trap (caught or ignored, /proc/<pid>/status): a shell that has not yet run its
// `trap` dies of the SIGTERM a test sends to exercise it, and on a loaded machine no
// fixed pause after the start is sure to be enough.
func waitTrapped(t *testing.T, what string, procs func() []int) {
	t.Helper()
	term := uint64(1) << (uint(syscall.SIGTERM) - 1)
	testkit.Eventually(t, what+"'s SIGTERM trap set", func() bool {
		for _, pid := range procs() {
			for _, field := range []string{"SigCgt", "SigIgn"} {
				if m, err := strconv.ParseUint(procStatus(pid, field), 16, 64); err == nil && m&term != 0 {
					return true
				}
			}
		}
		return false
	})
}

// followLogs runs `nexctl workload logs -f` and returns the first line matching want.
func (n *node) followLogs(t *testing.T, id string, want func(string) bool, timeout time.Duration) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, nexctlBin(t), append(append([]string{"--control-socket", n.socket}, n.natsArgs()...),
		"workload", "logs", "-f", id)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); cmd.Wait() }()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if want(sc.Text()) {
			return sc.Text()
		}
	}
	t.Fatalf("no matching line of %s from nexctl workload logs -f within %v", id, timeout)
	return ""
}

// tickAbove matches "tick N" lines with N > min.
func tickAbove(min int) func(string) bool {
	return func(l string) bool {
		v, ok := strings.CutPrefix(l, "tick ")
		k, err := strconv.Atoi(v)
		return ok && err == nil && k > min
	}
}

// TestNexletCrashKeepsWorkloads: kill -9 the native nexlet three times while 100
// services, a continuous writer and a job run. Every workload keeps its process (none
// restarted, lost or duplicated), the writer never meets EPIPE and its output after
// each adoption reaches `nexctl workload logs -f`, and the job runs exactly once with
// its exit code reported.
func TestNexletCrashKeepsWorkloads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"}})
	if n.cgroup == "" {
		t.Skip("needs a writable cgroup root (root and cgroup v1 memory) to find each workload's processes")
	}
	n.waitReady(t)
	nc := testnats.Connect(t, s)
	stopped, _ := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	flush(t, nc)

	const services = 99 // plus the writer: 100 services
	marker := fmt.Sprintf("nexd-e2e-restore-%d", time.Now().UnixNano())
	var ids []string
	for _, r := range n.runWorkloads(t, services, func(i int) []string {
		return []string{"--bids", "1", "--name", fmt.Sprintf("s%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	}) {
		ids = append(ids, r.ID)
	}
	// The writer fails loudly (exit 99) if a write ever fails; SIGPIPE would kill it.
	writer := n.runWorkload(t, "--bids", "1", "--name", "writer", "--", "/bin/sh", "-c",
		`i=0; while :; do i=$((i+1)); echo "tick $i" || exit 99; sleep 0.01; done`, marker)
	ids = append(ids, writer.ID)
	// Workloads run under dynamic uids: the job appends to a file anyone may write.
	ranFile := testkit.WriteFile(t, filepath.Join(testkit.PublicDir(t), "job-runs"), "")
	if err := os.Chmod(ranFile, 0o666); err != nil {
		t.Fatal(err)
	}
	job := n.runWorkload(t, "--bids", "1", "--name", "job", "--lifecycle", "job", "--", "/bin/sh", "-c",
		`echo ran >> "$0"; sleep 6; exit 7`, ranFile)

	before := map[string][]int{}
	// A service is sh and its sleep; the writer's sleeps come and go, so only its sh is
	// compared: the process of the group whose parent is not in it (not the lowest pid:
	// pids wrap, and a sleep's pid may be below its shell's).
	writerSh := func(procs []int) int {
		for _, p := range procs {
			ppid, err := strconv.Atoi(procStatus(p, "PPid"))
			if err == nil && !slices.Contains(procs, ppid) { // err: a sleep that is gone
				return p
			}
		}
		return 0
	}
	testkit.EventuallyWithin(t, 90*time.Second, "every service runs", func() bool {
		for _, id := range ids {
			p := n.groupProcs(id)
			if len(p) == 0 || (id != writer.ID && len(p) != 2) {
				return false
			}
			before[id] = p
		}
		return true
	})
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	// The OOM killer picks a workload before the nexlet (-500 where nexd may lower it,
	// else the workloads are raised above it).
	nexletAdj, _ := strconv.Atoi(readTrim(fmt.Sprintf("/proc/%d/oom_score_adj", nexlet)))
	wlAdj, _ := strconv.Atoi(readTrim(fmt.Sprintf("/proc/%d/oom_score_adj", before[ids[0]][0])))
	if nexletAdj >= wlAdj {
		t.Errorf("nexlet oom_score_adj %d, workload's %d: want the nexlet's lower", nexletAdj, wlAdj)
	}
	lastTick := 0
	for round := 1; round <= 3; round++ {
		if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		var next int
		testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool {
			next = nexletPID(n.cmd.Process.Pid)
			return next != 0 && next != nexlet
		})
		nexlet = next
		testkit.EventuallyWithin(t, 90*time.Second, fmt.Sprintf("round %d: all workloads listed running again", round), func() bool {
			running := 0
			for _, w := range n.workloads(t) {
				if w.State == string(protocol.WorkloadRunning) && slices.Contains(ids, w.ID) {
					running++
				}
			}
			return running == len(ids)
		})
		for _, id := range ids {
			if got := n.groupProcs(id); !slices.Equal(got, before[id]) && !(id == writer.ID && writerSh(got) == writerSh(before[id])) {
				t.Fatalf("round %d: workload %s processes %v, before the crash %v", round, id, got, before[id])
			}
		}
		line := n.followLogs(t, writer.ID, tickAbove(lastTick), 30*time.Second)
		lastTick, _ = strconv.Atoi(strings.TrimPrefix(line, "tick "))
		t.Logf("round %d: nexlet %d adopted %d workloads; writer output resumed at %q", round, nexlet, len(ids), line)
	}

	var ev protocol.WorkloadStoppedEvent
	testkit.EventuallyWithin(t, 60*time.Second, "the job's WORKLOADSTOPPED", func() bool {
		m, err := stopped.NextMsg(time.Second)
		if err != nil {
			return false
		}
		var e protocol.WorkloadStoppedEvent
		json.Unmarshal(m.Data, &e)
		if e.ID != job.ID {
			if slices.Contains(ids, e.ID) {
				t.Fatalf("service %s stopped: %+v", e.ID, e)
			}
			return false
		}
		ev = e
		return true
	})
	if ev.Metadata["exit_code"] != "7" {
		t.Errorf("job stopped with %+v, want exit code 7", ev)
	}
	time.Sleep(time.Second)
	if b, _ := os.ReadFile(ranFile); strings.Count(string(b), "ran") != 1 {
		t.Errorf("the job ran %d times, want exactly once", strings.Count(string(b), "ran"))
	}
	if p := n.groupProcs(writer.ID); writerSh(p) == 0 || writerSh(p) != writerSh(before[writer.ID]) {
		t.Errorf("the writer was restarted (EPIPE?): processes %v, before %v", p, before[writer.ID])
	}

	n.signal(t, syscall.SIGTERM)
	n.wait(t, 120*time.Second)
	if c := countProcs(marker); c != 0 {
		t.Fatalf("%d workload processes survived the stop", c)
	}
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// workloadsDir is where the native nexlet of a node with state dir dir keeps each
// workload's private directory (elsewhere when the runtime dir is not searchable by
// the workloads' dynamic uids: the nexlet leaves a pointer).
func workloadsDir(stateDir string) string {
	rt := filepath.Join(stateDir, "run", "native")
	if b, err := os.ReadFile(filepath.Join(rt, "workloads-dir")); err == nil {
		return strings.TrimSpace(string(b))
	}
	return filepath.Join(rt, "workloads")
}

// credsExpiry reads the expiry of the JWT in a workload's creds file.
func credsExpiry(t *testing.T, path string) time.Time {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("creds file: %v", err)
	}
	tok, err := jwt.ParseDecoratedJWT(b)
	if err != nil {
		t.Fatalf("creds file %s: %v", path, err)
	}
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		t.Fatalf("creds file %s: %v", path, err)
	}
	return time.Unix(uc.Expires, 0)
}

// TestLiveRestore: with live_restore, SIGTERM stops nexd and kill -9 kills it, and the
// next nexd (same state dir) adopts 100 services and a sealed --env one: the same
// processes, all listed running, and credential renewal goes on past the first JWT's
// lifetime. Without live_restore SIGTERM stops everything.
func TestLiveRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const ttl = 8 * time.Second
	srv, acct, sigSeed, creds := operatorNATS(t)
	url := srv.ClientURL()
	state := t.TempDir()
	opts := func(cg string, live bool) nodeOpts {
		extra := signingFlags(creds, sigSeed, acct, "--workload-creds-ttl", ttl.String(), "--state", "kv")
		if live {
			extra = append(extra, "--live-restore")
		}
		return nodeOpts{external: url, stateDir: state, cgroup: cg, extra: extra}
	}
	n := startNode(t, opts("", true))
	if n.cgroup == "" {
		t.Skip("needs a writable cgroup root (root and cgroup v1 memory) to find each workload's processes")
	}
	n.waitReady(t)
	ctl := func(n *node, args ...string) string {
		return n.mustCtl(t, append([]string{"--nats.creds-file", creds}, args...)...)
	}
	// A connection's wait, not the claim: 100 nexctl processes and two nexd on a
	// loaded CI host took longer than nexctl's default 5 s to connect.
	const connectWait = "30s"
	const services = 100
	marker := fmt.Sprintf("nexd-e2e-live-%d", time.Now().UnixNano())
	var ids []string
	for _, r := range n.runWorkloads(t, services, func(i int) []string {
		return []string{"--nats.creds-file", creds, "--nats.timeout", connectWait, "--bids", "1", "--name", fmt.Sprintf("s%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	}) {
		ids = append(ids, r.ID)
	}
	var sealed runResult
	json.Unmarshal([]byte(ctl(n, "--json", "--nats.timeout", connectWait, "workload", "run", "--bids", "1", "--name", "sealed", "--env", "SECRET=s3cr3t",
		"--", "/bin/sh", "-c", `echo "secret=$SECRET"; exec sleep 600`, marker)), &sealed)
	if sealed.ID == "" {
		t.Fatal("sealed workload not started")
	}
	ids = append(ids, sealed.ID)
	before := map[string][]int{}
	// The snapshot waits for each workload's settled process tree: a service is its sh
	// and the sleep it forks (under load the fork comes a moment after the sh appears),
	// the sealed one is a single process (its sh execs sleep, keeping its pid).
	testkit.EventuallyWithin(t, 90*time.Second, "every workload runs its whole process tree", func() bool {
		for _, id := range ids {
			p := n.groupProcs(id)
			want := 2
			if id == sealed.ID {
				want = 1
			}
			if len(p) != want {
				return false
			}
			before[id] = p
		}
		return true
	})
	credsFile := filepath.Join(workloadsDir(state), sealed.ID, "nats.creds")
	firstExpiry := credsExpiry(t, credsFile)

	// The native nexlet outlives nexd: jobs that end while nexd is down are reaped by
	// it, with their exit codes. Each job counts its runs in a file anyone may write.
	nc, err := nats.Connect(url, nats.UserCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	stopped, _ := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	flush(t, nc)
	ranFile := testkit.WriteFile(t, filepath.Join(testkit.PublicDir(t), "job-runs"), "")
	if err := os.Chmod(ranFile, 0o666); err != nil {
		t.Fatal(err)
	}
	// startJob runs a job that waits for its release file, then exits with code.
	startJob := func(n *node, name string, code int) (id, release string) {
		release = filepath.Join(testkit.PublicDir(t), name)
		var job runResult
		json.Unmarshal([]byte(ctl(n, "--json", "--nats.timeout", connectWait, "workload", "run", "--bids", "1", "--name", name, "--lifecycle", "job", "--",
			"/bin/sh", "-c", `echo "$2" >> "$0"; while [ ! -e "$1" ]; do sleep 0.1; done; exit `+strconv.Itoa(code),
			ranFile, release, name)), &job)
		if job.ID == "" {
			t.Fatalf("job %s not started", name)
		}
		testkit.EventuallyWithin(t, 30*time.Second, "job "+name+" runs", func() bool { return len(n.groupProcs(job.ID)) > 0 })
		return job.ID, release
	}
	// endWhileDown releases a job while no nexd runs and waits until it ended (reaped by
	// the nexlet, which outlives nexd).
	endWhileDown := func(n *node, id, release string) {
		t.Helper()
		if err := os.WriteFile(release, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		testkit.EventuallyWithin(t, 60*time.Second, "the job released while nexd was down ended", func() bool { return len(n.groupProcs(id)) == 0 })
	}
	// stoppedOnce waits for the WORKLOADSTOPPED of a job that ended while nexd was down,
	// with its exit code, and sees no second one. The nexlet's relayed event went nowhere
	// (its feeds pass through the node); the next nexd publishes it from the nexlet's
	// ended report, retried until a node acknowledges it.
	stoppedOnce := func(id string, code int) {
		t.Helper()
		var ev protocol.WorkloadStoppedEvent
		testkit.EventuallyWithin(t, 60*time.Second, "WORKLOADSTOPPED of a job that ended while nexd was down", func() bool {
			m, err := stopped.NextMsg(time.Second)
			if err != nil {
				return false
			}
			json.Unmarshal(m.Data, &ev)
			return ev.ID == id
		})
		if ev.Metadata["exit_code"] != strconv.Itoa(code) {
			t.Errorf("job ended while nexd was down with %+v, want exit code %d", ev, code)
		}
		for {
			m, err := stopped.NextMsg(2 * time.Second)
			if err != nil {
				return
			}
			var again protocol.WorkloadStoppedEvent
			if json.Unmarshal(m.Data, &again) == nil && again.ID == id {
				t.Errorf("a second WORKLOADSTOPPED for %s: %s", id, m.Data)
			}
		}
	}
	runs := func(name string) int {
		b, _ := os.ReadFile(ranFile)
		return strings.Count(string(b), name+"\n")
	}
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	nexletAlive := func(what string) {
		t.Helper()
		if st := procStatus(nexlet, "State"); st == "" || strings.HasPrefix(st, "Z") {
			t.Fatalf("%s: the native nexlet %d is gone (state %q)", what, nexlet, st)
		}
	}
	// adopted checks that the node's native nexlet is still the first one: adopted, not
	// started a second time (no nexlet is a child of the new nexd).
	adopted := func(n *node, what string) {
		t.Helper()
		nexletAlive(what)
		if p := nexletPID(n.cmd.Process.Pid); p != 0 {
			t.Fatalf("%s: nexd started a second native nexlet (%d) beside the adopted %d", what, p, nexlet)
		}
	}
	job7, release7 := startJob(n, "job7", 7)

	check := func(n *node, what string) {
		t.Helper()
		testkit.EventuallyWithin(t, 90*time.Second, what+": all workloads listed running", func() bool {
			running := 0
			for _, w := range n.workloads(t) {
				if w.State == string(protocol.WorkloadRunning) && slices.Contains(ids, w.ID) {
					running++
				}
			}
			return running == len(ids)
		})
		for _, id := range ids {
			if got := n.groupProcs(id); !slices.Equal(got, before[id]) {
				t.Fatalf("%s: workload %s processes %v, before %v", what, id, got, before[id])
			}
		}
	}

	// SIGTERM with live_restore: nexd exits 0 and leaves every workload running.
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	for _, id := range ids {
		if got := n.groupProcs(id); !slices.Equal(got, before[id]) {
			t.Fatalf("workload %s changed while nexd was down: %v, before %v", id, got, before[id])
		}
	}
	nexletAlive("after SIGTERM of nexd")
	endWhileDown(n, job7, release7)
	n2 := startNode(t, opts(n.cgroup, true))
	n2.waitReady(t)
	stoppedOnce(job7, 7)
	check(n2, "after SIGTERM and a new nexd")
	adopted(n2, "after SIGTERM and a new nexd")

	// kill -9: the same.
	job8, release8 := startJob(n2, "job8", 8)
	n2.cmd.Process.Kill()
	n2.wait(t, 30*time.Second)
	nexletAlive("after kill -9 of nexd")
	endWhileDown(n2, job8, release8)
	n3 := startNode(t, opts(n.cgroup, true))
	n3.waitReady(t)
	stoppedOnce(job8, 8)
	check(n3, "after kill -9 and a new nexd")
	adopted(n3, "after kill -9 and a new nexd")
	// The node heard of both ends (acknowledged reports), so neither job is in its
	// state any more, and neither ever ran twice.
	testkit.EventuallyWithin(t, 30*time.Second, "the jobs that ended while nexd was down left the node's state", func() bool {
		out := ctl(n3, "node", "state", n3.waitReady(t).NodeID)
		return !strings.Contains(out, job7) && !strings.Contains(out, job8)
	})
	if runs("job7") != 1 || runs("job8") != 1 {
		t.Errorf("job7 ran %d times, job8 %d times: want once each", runs("job7"), runs("job8"))
	}

	// nexctl node reexec: nexd execve()s itself, same pid, and adopts everything again;
	// a job that ends after the exec still has its exit code reported (nexd, the child
	// subreaper, reaps it).
	release := filepath.Join(testkit.PublicDir(t), "go")
	var job runResult
	json.Unmarshal([]byte(ctl(n3, "--json", "--nats.timeout", connectWait, "workload", "run", "--bids", "1", "--name", "job", "--lifecycle", "job", "--",
		"/bin/sh", "-c", `while [ ! -e "$0" ]; do sleep 0.1; done; exit 3`, release)), &job)
	testkit.EventuallyWithin(t, 30*time.Second, "the job runs", func() bool { return len(n3.groupProcs(job.ID)) > 0 })
	ctl(n3, "node", "reexec")
	testkit.EventuallyWithin(t, 60*time.Second, "the re-executed nexd ready again", func() bool {
		return strings.Count(n3.out.String(), "nex node ready") >= 2
	})
	n3.waitReady(t)
	select {
	case <-n3.done:
		t.Fatalf("nexd exited instead of re-executing: %v", n3.err)
	default:
	}
	check(n3, "after nexctl node reexec")
	adopted(n3, "after nexctl node reexec")
	if !strings.Contains(n3.out.String(), "re-exec: state handed over in a memfd") {
		t.Errorf("the re-executed nexd did not read the memfd handover:\n%s", n3.out.String())
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var ev protocol.WorkloadStoppedEvent
	testkit.EventuallyWithin(t, 60*time.Second, "the job's WORKLOADSTOPPED after the re-exec", func() bool {
		m, err := stopped.NextMsg(time.Second)
		if err != nil {
			return false
		}
		json.Unmarshal(m.Data, &ev)
		return ev.ID == job.ID
	})
	if ev.Metadata["exit_code"] != "3" {
		t.Errorf("job ended after the re-exec with %+v, want exit code 3", ev)
	}

	// Renewal goes on through the new nexd and nexlet, past the first JWT's lifetime.
	testkit.EventuallyWithin(t, 4*ttl, "credentials renewed past the first JWT's expiry", func() bool {
		return credsExpiry(t, credsFile).After(firstExpiry.Add(ttl))
	})
	if time.Now().Before(firstExpiry) {
		time.Sleep(time.Until(firstExpiry) + time.Second)
	}
	check(n3, "past the first credential TTL")
	if out := ctl(n3, "workload", "info", sealed.ID); strings.Contains(out, "s3cr3t") {
		t.Fatalf("workload info shows the sealed value:\n%s", out)
	}

	// Without live_restore a SIGTERM stops every workload.
	n3.signal(t, syscall.SIGTERM)
	n3.wait(t, 60*time.Second)
	n4 := startNode(t, opts(n.cgroup, false))
	n4.waitReady(t)
	check(n4, "after a restart into live_restore off")
	n4.signal(t, syscall.SIGTERM)
	n4.wait(t, 120*time.Second)
	if c := countProcs(marker); c != 0 {
		t.Fatalf("%d workload processes survived a stop without live_restore", c)
	}
	if st := procStatus(nexlet, "State"); st != "" && !strings.HasPrefix(st, "Z") {
		t.Fatalf("the native nexlet %d survived a stop without live_restore", nexlet)
	}
}
