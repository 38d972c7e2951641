package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
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
)

func TestSummarize(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	for _, tc := range []struct {
		name          string
		in            []time.Duration
		p50, p99, max time.Duration
	}{
		{"empty", nil, 0, 0, 0},
		{"one", ms(7), 7 * time.Millisecond, 7 * time.Millisecond, 7 * time.Millisecond},
		{"unsorted", ms(5, 1, 4, 2, 3), 3 * time.Millisecond, 5 * time.Millisecond, 5 * time.Millisecond},
		{"hundred", func() []time.Duration {
			var d []time.Duration
			for i := 100; i >= 1; i-- {
				d = append(d, time.Duration(i)*time.Millisecond)
			}
			return d
		}(), 50 * time.Millisecond, 99 * time.Millisecond, 100 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Summarize(tc.in)
			if s.P50 != tc.p50 || s.P99 != tc.p99 || s.Max != tc.max || s.N != len(tc.in) {
				t.Errorf("Summarize = %v, want p50 %s p99 %s max %s", s, tc.p50, tc.p99, tc.max)
			}
		})
	}
}

func TestTrackerCountsEachAnnouncement(t *testing.T) {
	tr := newTracker()
	done := make(chan time.Time, 1)
	go func() {
		at, err := tr.wait(context.Background(), "a")
		if err != nil {
			t.Error(err)
		}
		done <- at
	}()
	tr.announce("a")
	tr.announce("a")
	tr.announce("b")
	select {
	case at := <-done:
		if at.IsZero() {
			t.Error("zero announcement time")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not return after the announcement")
	}
	if c := tr.counts(); c["a"] != 2 || c["b"] != 1 || len(c) != 2 {
		t.Errorf("counts = %v", c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := tr.wait(ctx, "never"); err == nil {
		t.Error("wait for an id that never announced returned no error")
	}
	tr.reset()
	if c := tr.counts(); len(c) != 0 {
		t.Errorf("counts after reset = %v", c)
	}
}

func TestProcReadersOnSelf(t *testing.T) {
	pid := os.Getpid()
	rss, threads, err := procStatus(pid)
	if err != nil || rss <= 0 || threads <= 0 {
		t.Fatalf("procStatus = %d, %d, %v", rss, threads, err)
	}
	if pss, err := procPSS(pid); err != nil || pss <= 0 {
		t.Errorf("procPSS = %d, %v", pss, err)
	}
	if _, err := procCPU(pid); err != nil {
		t.Errorf("procCPU: %v", err)
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	found := false
	for _, c := range childrenOf(pid) {
		found = found || c == cmd.Process.Pid
	}
	if !found {
		t.Errorf("childrenOf(self) = %v, misses %d", childrenOf(pid), cmd.Process.Pid)
	}
}

func TestReportRenders(t *testing.T) {
	r := Result{Scenario: "placement", Variant: "1 node(s)"}
	r.ms("total p50", 3*time.Millisecond).atMost(5, "<= 5 ms")
	r.add("nexd RSS", 31.5, "MB").atMost(25, "<= 25 MB")
	rep := &Report{Results: []Result{r}, Command: "nexbench placement"}
	var tbl, js bytes.Buffer
	if err := rep.WriteTable(&tbl); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"== placement / 1 node(s)", "ok <= 5 ms", "MISSED <= 25 MB"} {
		if !strings.Contains(tbl.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, tbl.String())
		}
	}
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Results) != 1 || *back.Results[0].Metrics[0].Met != true {
		t.Errorf("JSON round trip: %v %+v", err, back)
	}
}

// TestSmoke builds nexd and runs the ready, control and placement scenarios with tiny
// counts against real nexd processes, then checks that nothing is left behind.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs nexd")
	}
	dir := t.TempDir()
	nexd := filepath.Join(dir, "nexd")
	build := exec.Command("go", "build", "-o", nexd, "github.com/nexd-project/nexd/cmd/nexd")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build nexd: %v\n%s", err, out)
	}
	samples := filepath.Join(t.TempDir(), "samples.tsv")
	h, err := NewHarness(Options{Nexd: nexd, Quick: true, Placements: 3, Nodes: 2, SamplesOut: samples})
	if err != nil {
		t.Fatal(err)
	}
	runDir := h.Dir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := h.Run(ctx, []string{"ready", "placement"})
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Results) != 6 {
		t.Fatalf("results = %+v", rep.Results)
	}
	for _, r := range rep.Results {
		if r.Err != "" {
			t.Errorf("%s/%s: %s", r.Scenario, r.Variant, r.Err)
		}
		if r.Scenario == "placement" && (len(r.Metrics) == 0 || r.Metrics[0].Value != 3) {
			t.Errorf("%s: placements = %+v", r.Variant, r.Metrics)
		}
	}
	// --samples-out: one line a placement, 3 in each of the 4 placement variants, each
	// with a start and four legs, the total the largest.
	b, err := os.ReadFile(samples)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 12 {
		t.Errorf("%d sample lines, want 12:\n%s", len(lines), b)
	}
	for _, l := range lines {
		f := strings.Split(l, "\t")
		if len(f) != 6 || !strings.HasPrefix(f[0], "1 node(s)") && !strings.HasPrefix(f[0], "2 node(s)") {
			t.Errorf("sample line %q: want variant, start and four legs", l)
			continue
		}
		total, _ := strconv.ParseFloat(f[5], 64)
		for _, leg := range f[2:5] {
			if v, err := strconv.ParseFloat(leg, 64); err != nil || v < 0 || v > total {
				t.Errorf("sample line %q: leg %q not within the total", l, leg)
			}
		}
	}
	if _, err := os.Stat(runDir); !os.IsNotExist(err) {
		t.Errorf("run dir %s left behind: %v", runDir, err)
	}
	if left, _ := filepath.Glob("/sys/fs/cgroup/*/nexbench-" + h.runID); len(left) > 0 {
		t.Errorf("cgroups left behind: %v", left)
	}
}

func TestReadyLogWithOrWithoutNewline(t *testing.T) {
	for _, in := range []string{"nexbench-ready", "nexbench-ready\n", "x\nnexbench-ready\r\n"} {
		if !isReadyLog([]byte(in)) {
			t.Errorf("isReadyLog(%q) = false", in)
		}
	}
	if isReadyLog([]byte("nexbench-ready-not")) {
		t.Error("isReadyLog took a different line")
	}
}

// TestCompareWorkloadsRun places both workloads the tool deploys (the shell one that
// compare uses, and the NATS one) on a real nexd and, when NEXBENCH_UPSTREAM_NEX names
// upstream's nex binary, on an upstream node too, then runs a quick compare.
func TestCompareWorkloadsRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs nexd")
	}
	nexd, self := buildBins(t)
	upstream := os.Getenv("NEXBENCH_UPSTREAM_NEX")
	h, err := NewHarness(Options{Nexd: nexd, Self: self, Upstream: upstream, Quick: true, Placements: 3, CompareWorkloads: []int{5}})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	place := func(t *testing.T, url string) {
		c, err := newClient(url, "system")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := waitBids(ctx, c, 1); err != nil {
			t.Fatal(err)
		}
		for _, kind := range []string{"sh", "nats"} {
			p, err := c.place(ctx, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}, workloadSpec{Kind: kind, Self: self}, "wl-"+kind, time.Minute)
			if err != nil {
				t.Fatalf("%s workload: %v", kind, err)
			}
			if err := c.list(ctx); err != nil {
				t.Errorf("list: %v", err)
			}
			if err := c.undeploy(ctx, p.ID, gatherOpts{first: 30 * time.Second, stall: time.Second, max: 1}); err != nil {
				t.Errorf("%s workload: %v", kind, err)
			}
		}
	}
	t.Run("nexd", func(t *testing.T) {
		ns, err := h.natsServer()
		if err != nil {
			t.Fatal(err)
		}
		n, _, err := h.readyNode(ctx, nodeSpec{Servers: []string{ns.URL()}})
		if err != nil {
			t.Fatal(err)
		}
		defer h.stopNode(n)
		place(t, ns.URL())
	})
	// compare's measured nexd: its runtime paths on tmpfs in a mount namespace of its
	// own, none of it seen by the host.
	t.Run("nexd-runtime-tmpfs", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("mounts need root")
		}
		before, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Fatal(err)
		}
		ns, err := h.natsServer()
		if err != nil {
			t.Fatal(err)
		}
		n, _, err := h.readyNode(ctx, nodeSpec{Servers: []string{ns.URL()}, RuntimeTmpfs: self})
		if err != nil {
			t.Fatal(err)
		}
		defer h.stopNode(n)
		// Its leases and systemd's locks are its own: so are its uids (ownUIDRange), or
		// its releases could kill other nexlets' workloads of the default range.
		if lo := nodeUIDRangeStart(t, n.Pid()); lo <= 65519 {
			t.Errorf("the node's workload uids from %d: not a range of its own above the host's default 61184-65519", lo)
		}
		place(t, ns.URL())
		mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", n.Pid()))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{filepath.Join(n.spec.Dir, "state", "run"), "/run/nex-workloads", "/run/nex-dynamic-uid", "/run/systemd/dynamic-uid"} {
			if !slices.ContainsFunc(strings.Split(string(mi), "\n"), func(l string) bool {
				return strings.Contains(l, " "+p+" ") && strings.Contains(l, " - tmpfs ")
			}) {
				t.Errorf("nexd's mounts have no tmpfs on %s:\n%s", p, mi)
			}
		}
		after, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Fatal(err)
		}
		if string(after) != string(before) {
			t.Errorf("the host's mounts changed:\n%s\nbefore:\n%s", after, before)
		}
	})
	// compare's floor: the client's own auction, deploy, announcement, list and stop
	// against the floor node, and no process of it left after the stop.
	// floorOn starts a floor node (with env) on a server of its own and a client there;
	// both end with the subtest.
	floorOn := func(t *testing.T, env ...string) (*floorProcess, *client) {
		ns, err := h.natsServer()
		if err != nil {
			t.Fatal(err)
		}
		fl, err := startFloor(ctx, self, ns.URL(), "system", env...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = fl.stop() })
		c, err := newClient(ns.URL(), "system")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return fl, c
	}
	t.Run("floor", func(t *testing.T) {
		fl, c := floorOn(t)
		for i := range 3 {
			p, err := c.place(ctx, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}, workloadSpec{Kind: "sh"}, fmt.Sprintf("floor-%d", i), time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if kids := children(t, fl.cmd.Process.Pid); len(kids) != 1 {
				t.Errorf("floor node's children with one workload: %v", kids)
			}
			if err := c.list(ctx); err != nil {
				t.Errorf("list: %v", err)
			}
			if err := c.undeploy(ctx, p.ID, gatherOpts{first: 30 * time.Second, stall: time.Second, max: 1}); err != nil {
				t.Fatal(err)
			}
			if kids := children(t, fl.cmd.Process.Pid); len(kids) != 0 {
				t.Errorf("floor node's children after the stop: %v", kids)
			}
		}
		if err := c.undeploy(ctx, "nosuch", gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}); err == nil {
			t.Error("stop of an unknown workload: no error")
		}
		if err := fl.stop(); err != nil {
			t.Errorf("floor node's stop: %v", err)
		}
	})
	// The floor with nexd's parts added (NEXBENCH_FLOOR): the workload runs under a
	// uid of its own, in a cgroup of its own, started by the floor's second process,
	// and nothing of it is left after the stop.
	t.Run("floor-variants", func(t *testing.T) {
		fl, c := floorOn(t, floorVariantEnv+"=uid,cgroup,hop,jwt")
		starter := children(t, fl.cmd.Process.Pid)
		if len(starter) != 1 {
			t.Fatalf("floor node's children: %v, want its starter", starter)
		}
		for i := range 2 {
			p, err := c.place(ctx, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}, workloadSpec{Kind: "sh"}, fmt.Sprintf("floorv-%d", i), time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			kids := children(t, atoi(t, starter[0]))
			if len(kids) != 1 {
				t.Fatalf("starter's children with one workload: %v", kids)
			}
			status, err := os.ReadFile("/proc/" + kids[0] + "/status")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(status), "\nUid:\t610") {
				t.Errorf("workload's uid is not one of the floor's:\n%s", status)
			}
			cg, err := os.ReadFile("/proc/" + kids[0] + "/cgroup")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(cg), "nexbench-floor-") {
				t.Errorf("workload is not in a floor group:\n%s", cg)
			}
			if err := c.undeploy(ctx, p.ID, gatherOpts{first: 30 * time.Second, stall: time.Second, max: 1}); err != nil {
				t.Fatal(err)
			}
			// The stop ends when the workload's output ends; the starter reaps it
			// right after, on its own, so its zombie may still be listed for a moment.
			var left []string
			for wait := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
				if left = children(t, atoi(t, starter[0])); len(left) == 0 || time.Now().After(wait) {
					break
				}
			}
			if len(left) != 0 {
				t.Errorf("starter's children 5 s after the stop: %v", left)
			}
		}
		if err := fl.stop(); err != nil { // it removed its own group: nothing left
			t.Errorf("floor node's stop: %v", err)
		}
	})
	// A floor node killed with a workload running (compare's SIGKILL after its stop's
	// wait, or anyone's kill -9) could neither end it nor remove its cgroup root, and
	// with hop its starter dies with it (its parent-death signal): compare, its parent,
	// knows its pid, hence the group, and kills what is in it and removes it once the
	// floor node ended. Before, both the group and the workload stayed.
	t.Run("floor-killed", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("the cgroup variant needs root")
		}
		for _, variant := range []string{"cgroup", "cgroup,hop"} {
			t.Run(variant, func(t *testing.T) {
				fl, c := floorOn(t, floorVariantEnv+"="+variant)
				pid := fl.cmd.Process.Pid
				if _, err := c.place(ctx, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}, workloadSpec{Kind: "sh"}, "floor-killed", time.Minute); err != nil {
					t.Fatal(err)
				}
				groups, err := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/*/nexd/%s", floorGroup(pid)))
				if err != nil || len(groups) == 0 {
					t.Fatalf("the floor node's groups: %v, %v", groups, err)
				}
				var workload string
				for kids := children(t, pid); len(kids) > 0 && workload == ""; {
					k := kids[0]
					if cg, err := os.ReadFile("/proc/" + k + "/cgroup"); err == nil && strings.Contains(string(cg), floorGroup(pid)+"/") {
						workload = k
					}
					kids = append(kids[1:], children(t, atoi(t, k))...)
				}
				if workload == "" {
					t.Fatal("no workload in the floor node's group among its descendants")
				}
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				<-fl.done
				if err := fl.left(); err == nil || !strings.Contains(err.Error(), "processes in its cgroup: killed") {
					t.Errorf("what the killed floor node left: %v, want its workload killed", err)
				}
				for _, g := range groups {
					if _, err := os.Stat(g); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("group %s left (%v)", g, err)
					}
				}
				// Gone, or a zombie its new parent has not reaped yet: not running.
				if st, err := os.ReadFile("/proc/" + workload + "/stat"); err == nil && !strings.Contains(string(st), ") Z ") {
					t.Errorf("workload %s still runs: %s", workload, st)
				}
			})
		}
	})
	t.Run("upstream", func(t *testing.T) {
		if upstream == "" {
			t.Skip("NEXBENCH_UPSTREAM_NEX (upstream's nex binary) not set")
		}
		ns, err := h.natsServer()
		if err != nil {
			t.Fatal(err)
		}
		u, err := startUpstream(h.o.Upstream, filepath.Join(h.dir, "upstream-test"), "upstream-test", ns.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer u.stop(30 * time.Second)
		if _, err := u.waitReady(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		place(t, ns.URL())
	})
	t.Run("compare", func(t *testing.T) {
		if upstream == "" {
			t.Skip("NEXBENCH_UPSTREAM_NEX (upstream's nex binary) not set")
		}
		rep, err := h.Run(ctx, []string{"compare"})
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		_ = rep.WriteTable(&buf)
		t.Log(buf.String())
		if len(rep.Results) != 1 || rep.Results[0].Err != "" {
			t.Fatalf("compare: %+v", rep.Results)
		}
	})
}

// TestReadyAB: ready with a B side (here the same nexd with the NATS registration of
// its nexlet, NEXD_LOCAL_REGISTER=off) times both, alternating, and nothing else.
func TestReadyAB(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs nexd")
	}
	nexd := filepath.Join(t.TempDir(), "nexd")
	build := exec.Command("go", "build", "-o", nexd, "github.com/nexd-project/nexd/cmd/nexd")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build nexd: %v\n%s", err, out)
	}
	h, err := NewHarness(Options{Nexd: nexd, Quick: true, ReadyStarts: 2, EnvB: []string{"NEXD_LOCAL_REGISTER=off"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := h.Run(ctx, []string{"ready"})
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Results) != 1 || rep.Results[0].Err != "" || len(rep.Results[0].Metrics) != 5 {
		t.Fatalf("results = %+v", rep.Results)
	}
	for _, m := range rep.Results[0].Metrics[1:3] {
		if m.Value <= 0 {
			t.Fatalf("%s = %v", m.Name, m.Value)
		}
	}
}

func TestABEnvMustBeKeyValue(t *testing.T) {
	var out, errs bytes.Buffer
	if code := Main(context.Background(), []string{"--ab-env", "NOVALUE", "ready"}, &out, &errs); code != 2 ||
		!strings.Contains(errs.String(), `--ab-env "NOVALUE": want KEY=VALUE`) {
		t.Fatalf("exit %d, stderr %q", code, errs.String())
	}
}

// buildBins builds nexd and nexbench into a directory of their own, removed after t.
// Workloads run under dynamic uids when nexd is root: the directory must be searchable
// by anyone, which t.TempDir's is not.
func buildBins(t *testing.T) (nexd, self string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "benchbins-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	nexd, self = filepath.Join(dir, "nexd"), filepath.Join(dir, "nexbench")
	for bin, pkg := range map[string]string{nexd: "github.com/nexd-project/nexd/cmd/nexd", self: "github.com/nexd-project/nexd/cmd/nexbench"} {
		if out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
	}
	return nexd, self
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// children lists the pids of pid's children (every thread's).
func children(t *testing.T, pid int) []string {
	t.Helper()
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("tasks of %d: %v", pid, err)
	}
	var out []string
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, strings.Fields(string(b))...)
	}
	return out
}
