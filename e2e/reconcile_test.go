package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestUnackedEndNotRerun: a proxy between nexd (and its nexlet) and NATS drops every
// workload-ended report, so a finished job's end is never acknowledged and the job
// stays in node state. nexd is then stopped and started again (no live_restore: the
// nexlet and the service go down with it). The new nexlet reports what it holds when
// it registers; the node removes the job it does not hold instead of replaying it, so
// the job does not run a second time, and starts the service again.
func TestUnackedEndNotRerun(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	var ended atomic.Int64
	p := startDropProxy(t, s.ClientURL(), proxyRules{drop: func(subj string) bool {
		if strings.Contains(subj, ".WORKLOADENDED.") {
			ended.Add(1)
			return true
		}
		return strings.HasSuffix(subj, ".events."+protocol.EventWorkloadStopped)
	}})
	dir := t.TempDir()
	runs := filepath.Join(testkit.PublicDir(t), "runs")
	testkit.WriteFile(t, runs, "")
	if err := os.Chmod(runs, 0o666); err != nil { // the job runs as a dynamic uid
		t.Fatal(err)
	}
	opts := nodeOpts{external: p.URL(), stateDir: dir, extra: []string{"--state", "kv"}}
	n := startNode(t, opts)
	st := n.waitReady(t)
	nc := testnats.Connect(t, s)
	svc := n.runWorkload(t, "--name", "svc", "--", "/bin/sleep", "600")
	job := n.runWorkload(t, "--name", "job", "--lifecycle", "job", "--", "/bin/sh", "-c", "echo ran >> "+runs)
	count := func() int {
		b, _ := os.ReadFile(runs)
		return strings.Count(string(b), "ran")
	}
	testkit.Eventually(t, "the job ran and its end was reported (and dropped)", func() bool {
		return count() == 1 && ended.Load() > 0
	})
	if !kvHas(t, nc, st.NodeID, "native", job.ID) {
		t.Fatal("the finished job left node state although its end was never acknowledged")
	}

	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("nexd exited %d\n%s", code, n.out.String())
	}
	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	testkit.Eventually(t, "the service runs again", func() bool {
		return slices.ContainsFunc(n2.workloads(t), func(w control.Workload) bool { return w.ID == svc.ID && w.State == "running" })
	})
	time.Sleep(2 * time.Second) // a replayed job would have run by now
	if got := count(); got != 1 {
		t.Fatalf("the job ran %d times\nnexd:\n%s", got, n2.out.String())
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the finished job out of node state", func() bool {
		return !kvHas(t, nc, st.NodeID, "native", job.ID)
	})
	if ws := n2.workloads(t); slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == job.ID }) {
		t.Fatalf("the finished job is listed again: %+v", ws)
	}
}

// startedBy maps each workload to the supervised nexlet that logged starting it
// (the echo nexlet's "echo workload started" line, which nexd tags with nexlet=<name>).
func startedBy(out string) map[string][]string {
	by := map[string][]string{}
	for line := range strings.SplitSeq(out, "\n") {
		if !strings.Contains(line, `msg="echo workload started"`) {
			continue
		}
		var nexlet, id string
		for f := range strings.FieldsSeq(line) {
			if v, ok := strings.CutPrefix(f, "nexlet="); ok {
				nexlet = v
			}
			if v, ok := strings.CutPrefix(f, "workload_id="); ok {
				id = v
			}
		}
		by[id] = append(by[id], nexlet)
	}
	return by
}

// echoNexlet builds the example echo nexlet where nexd may run it.
func echoNexlet(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(testkit.PublicDir(t), "echo-nexlet")
	build := exec.Command("go", "build", "-o", bin, "./contrib/examples/echo-nexlet")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the echo nexlet: %v\n%s", err, out)
	}
	return bin
}

// TestTwoNexletsOfOneTypeKeepTheirWorkloads: two echo nexlets (one type, two
// supervised instances) each run two services. After nexd stops and starts again (no
// live_restore), each instance gets back exactly its own workloads from node state:
// ownership is recorded with each workload, not decided by which nexlet of the type
// registers first.
func TestTwoNexletsOfOneTypeKeepTheirWorkloads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	bin := echoNexlet(t)
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	opts := nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv", "--disable-native-start",
		"--agents.uri", "file://" + bin, "--agents.argv", "--name", "--agents.argv", "echo-a",
		"--agents.uri", "file://" + bin, "--agents.argv", "--name", "--agents.argv", "echo-b"}}
	n := startNode(t, opts)
	n.waitReady(t)
	var ids []string
	for i := range 4 {
		out := n.mustCtl(t, "--json", "workload", "run", "--type", "echo", "--name", fmt.Sprintf("s%d", i),
			"--start-request", `{"message":"hi","interval":"30s"}`)
		var r runResult
		if err := json.Unmarshal([]byte(out), &r); err != nil || r.ID == "" {
			t.Fatalf("workload run --json: %v: %q", err, out)
		}
		ids = append(ids, r.ID)
	}
	var before map[string][]string
	testkit.Eventually(t, "each start logged", func() bool {
		before = startedBy(n.out.String())
		return len(before) == len(ids)
	})
	per := map[string]int{}
	for _, id := range ids {
		if len(before[id]) != 1 {
			t.Fatalf("workload %s started by %v", id, before[id])
		}
		per[before[id][0]]++
	}
	if len(per) != 2 {
		t.Fatalf("the deploys did not go to both nexlets: %v", per)
	}

	// Each kept the name it registered under for the next run, which reserves it for
	// that nexlet from its start (daemon/node TestRogueNexletSquatsNameAtStart).
	var kept []string
	files, _ := filepath.Glob(filepath.Join(dir, "nexlets", "*.names"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		kept = append(kept, string(b))
	}
	slices.Sort(kept)
	if !slices.Equal(kept, []string{"echo-a\n", "echo-b\n"}) {
		t.Errorf("names kept for the next run: %q in %v, want echo-a and echo-b", kept, files)
	}

	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("nexd exited %d\n%s", code, n.out.String())
	}
	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	var after map[string][]string
	testkit.Eventually(t, "each workload replayed", func() bool {
		after = startedBy(n2.out.String())
		return len(after) >= len(ids)
	})
	time.Sleep(time.Second) // a duplicate replay would be logged by now
	after = startedBy(n2.out.String())
	for _, id := range ids {
		if len(after[id]) != 1 || after[id][0] != before[id][0] {
			t.Errorf("workload %s: started by %v before the restart, replayed to %v after", id, before[id], after[id])
		}
	}
	if t.Failed() {
		t.Logf("nexd:\n%s", n2.out.String())
	}
}
