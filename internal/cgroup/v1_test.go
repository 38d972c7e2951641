package cgroup

import (
	"errors"
	"fmt"
	"github.com/nexd-project/nexd/internal/earlynexlet"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// v1Root gives a manager on a unique group in the real v1 hierarchies of this machine,
// removed (with anything left in it) when the test or benchmark ends. Benchmarks pass
// their own *testing.B: a bare testing.T never runs its cleanups, and every benchmark
// run left an empty nexd-test-<n> in each hierarchy.
func v1Root(t testing.TB) *Manager {
	t.Helper()
	for _, c := range []string{"memory", "cpu", "pids"} {
		if !writable(filepath.Join("/sys/fs/cgroup", c)) {
			t.Skipf("no writable cgroup v1 %s hierarchy here", c)
		}
	}
	root := "/sys/fs/cgroup/memory/" + testkit.OwnedName(t, "nexd-test-")
	m, err := Detect(root, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.group("").Remove(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if m.Mode() != ModeV1 || !slices.Equal(m.Enforced(), []string{"memory", "cpu", "pids"}) {
		t.Fatalf("mode %s enforced %v reason %q", m.Mode(), m.Enforced(), m.Reason())
	}
	return m
}

func (m *Manager) hierDir(ctrl string) string {
	for _, h := range m.hiers {
		if h.has(ctrl) {
			return h.Root
		}
	}
	return ""
}

// limitCheck gives a check that group's file in ctrl's hierarchy reads want.
func limitCheck(t *testing.T, m *Manager, group string) func(ctrl, file, want string) {
	return func(ctrl, file, want string) {
		t.Helper()
		if got := readTrim(t, filepath.Join(m.hierDir(ctrl), group, file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
}

func TestV1CreateLimits(t *testing.T) {
	m := v1Root(t)
	_, err := m.Create("a", Limits{MemoryMax: 64 << 20, MemoryHigh: 32 << 20, CPUMax: 0.5, PidsMax: 50})
	must(t, err)
	check := limitCheck(t, m, "a")
	check("memory", "memory.limit_in_bytes", "67108864")
	check("memory", "memory.soft_limit_in_bytes", "33554432")
	check("cpu", "cpu.cfs_quota_us", "50000")
	check("cpu", "cpu.cfs_period_us", "100000")
	check("pids", "pids.max", "50")
	// Reuse with no limits resets them.
	_, err = m.Create("a", Limits{})
	must(t, err)
	check("cpu", "cpu.cfs_quota_us", "-1")
	check("pids", "pids.max", "max")
	if v, _ := strconv.ParseUint(readTrim(t, filepath.Join(m.hierDir("memory"), "a", "memory.limit_in_bytes")), 10, 64); v < 1<<50 {
		t.Errorf("memory limit not reset: %d", v)
	}
}

// A group Create makes has the kernel's defaults: no limit file is written for a limit
// left at its default (each write costs the deploy or the nexlet's start; a CPU one
// takes the kernel's bandwidth lock), while a group that existed gets every one, so
// that nothing of its earlier use is left (TestV1CreateLimits).
func TestV1CreateFreshWritesOnlyLimitsSet(t *testing.T) {
	m := v1Root(t)
	var writes []string
	write := m.ops.write
	m.ops.write = func(p, v string) error {
		writes = append(writes, filepath.Base(p)+"="+v)
		return write(p, v)
	}
	_, err := m.Create("fresh/nexlet", Limits{})
	must(t, err)
	if len(writes) != 0 {
		t.Errorf("a new group without limits got writes %v", writes)
	}
	check := limitCheck(t, m, "fresh/nexlet")
	check("cpu", "cpu.cfs_quota_us", "-1")
	check("cpu", "cpu.cfs_period_us", "100000")
	check("pids", "pids.max", "max")
	if v, _ := strconv.ParseUint(readTrim(t, filepath.Join(m.hierDir("memory"), "fresh/nexlet", "memory.limit_in_bytes")), 10, 64); v < 1<<50 {
		t.Errorf("a new group has a memory limit: %d", v)
	}
	writes = nil
	_, err = m.Create("fresh/workloads", Limits{PidsMax: 7})
	must(t, err)
	if !slices.Equal(writes, []string{"pids.max=7"}) {
		t.Errorf("a new group with only pids_max got writes %v, want [pids.max=7]", writes)
	}
	writes = nil
	_, err = m.Create("fresh/nexlet", Limits{})
	must(t, err)
	if len(writes) != 5 {
		t.Errorf("an existing group got writes %v, want all five limits reset", writes)
	}
}

func TestV1StartProcsKill(t *testing.T) {
	m := v1Root(t)
	g, err := m.Create("n/nexlet", Limits{PidsMax: 20})
	must(t, err)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "bg")
	// The child forks a grandchild that would outlive it.
	cmd := exec.Command("/bin/sh", "-c", `sleep 3600 & echo $! > `+pidFile+`.tmp; mv `+pidFile+`.tmp `+pidFile+`; exec sleep 3600`)
	must(t, g.Start(cmd))
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	testkit.Eventually(t, "the grandchild", func() bool { _, err := os.Stat(pidFile); return err == nil })
	bg, err := strconv.Atoi(readTrim(t, pidFile))
	must(t, err)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	must(t, err)
	_, in := parseSelfCgroup(b)
	for _, h := range m.hiers {
		want := strings.TrimPrefix(filepath.Join(h.Root, "n/nexlet"), h.Mount)
		if got := in[strings.Split(h.Name, ",")[0]]; got != want {
			t.Errorf("child in %s group %q, want %q", h.Name, got, want)
		}
	}
	var pids []int
	testkit.Eventually(t, "procs = child and grandchild", func() bool { // mv may still be exiting
		pids, err = g.Procs()
		must(t, err)
		return slices.Equal(pids, sorted(cmd.Process.Pid, bg))
	})
	// nexd's own starting thread went back where it came from.
	for _, c := range []string{"memory", "cpu", "pids"} {
		ps, _ := readPids(filepath.Join(m.hierDir(c), "n/nexlet", "cgroup.procs"))
		if slices.Contains(ps, os.Getpid()) {
			t.Fatalf("the test process is left in the %s group", c)
		}
	}
	s, err := g.Stats()
	must(t, err)
	if s.Pids < 2 || s.MemoryCurrent == 0 { // pids.current counts tasks
		t.Errorf("stats %+v", s)
	}
	// Killing the group's parent reaches everything below it.
	parent := m.group("n")
	must(t, parent.Kill())
	<-waited
	if alive(bg) || alive(cmd.Process.Pid) {
		t.Fatal("a process survived the group kill")
	}
	must(t, parent.Remove())
	for _, c := range []string{"memory", "cpu", "pids", "cpuacct"} {
		if _, err := os.Stat(filepath.Join(m.hierDir(c), "n")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s group not removed: %v", c, err)
		}
	}
}

func sorted(p ...int) []int { slices.Sort(p); return p }

// Remove's rmdir first (removeEmpty) must not cost a group its kill: a group with a
// process and a child group holding another is killed and removed in every
// hierarchy; and so is one whose first rmdirs succeed and a later one fails (its
// process was moved out of the first hierarchy's group: removed there, busy in the
// next), the fallback's listing and removal taking a hierarchy whose group is gone.
func TestV1RemoveKillsWhatIsLeft(t *testing.T) {
	m := v1Root(t)
	start := func(g *Group) *exec.Cmd {
		t.Helper()
		cmd := exec.Command("sleep", "3600")
		must(t, g.Start(cmd))
		return cmd
	}
	gone := func(cmds ...*exec.Cmd) {
		t.Helper()
		for _, c := range cmds {
			done := make(chan struct{})
			go func() { _ = c.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Errorf("pid %d survived Remove", c.Process.Pid)
				_ = c.Process.Kill()
				<-done
				continue
			}
			if c.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Errorf("pid %d: %v, want killed", c.Process.Pid, c.ProcessState)
			}
		}
	}
	removed := func(rel string) {
		t.Helper()
		for _, h := range m.hiers {
			if _, err := os.Stat(filepath.Join(h.Root, rel)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s group %s not removed: %v", h.Name, rel, err)
			}
		}
	}

	g, err := m.Create("live", Limits{})
	must(t, err)
	c, err := m.Create("live/child", Limits{})
	must(t, err)
	p1, p2 := start(g), start(c)
	must(t, g.Remove())
	gone(p1, p2)
	removed("live")

	if len(m.hiers) < 2 {
		t.Skip("one v1 hierarchy: no partial removal")
	}
	g, err = m.Create("partial", Limits{})
	must(t, err)
	p := start(g)
	must(t, writeFile(filepath.Join(m.hiers[0].Root, "cgroup.procs"), itoa(p.Process.Pid)))
	must(t, g.Remove())
	gone(p)
	removed("partial")
}

func TestV1OOMAndStats(t *testing.T) {
	m := v1Root(t)
	g, err := m.Create("oom", Limits{MemoryMax: 32 << 20})
	must(t, err)
	n, err := g.OOMKills()
	must(t, err)
	if n != 0 {
		t.Fatalf("fresh group has %d OOM kills", n)
	}
	// Burn some CPU, then hold 300 MB in a pipe reader: the OOM killer strikes.
	cmd := exec.Command("/bin/sh", "-c", `i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; head -c 300M /dev/zero | tail > /dev/null`)
	must(t, g.Start(cmd))
	err = cmd.Wait()
	t.Logf("oom child: %v", err)
	n, err = g.OOMKills()
	must(t, err)
	if n < 1 {
		t.Fatalf("OOM kill not detected (oom_control: %s)", readTrim(t, filepath.Join(m.hierDir("memory"), "oom/memory.oom_control")))
	}
	s, err := g.Stats()
	must(t, err)
	if s.OOMKills != n || s.CPUUsageNsec == 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestV1CleanupStale(t *testing.T) {
	m := v1Root(t)
	nexlets := m.Sub("nexlets")
	var cmds []*exec.Cmd
	for _, rel := range []string{"old/nexlet", "old/workloads/w1", "keep/nexlet"} {
		g, err := nexlets.Create(rel, Limits{})
		must(t, err)
		c := exec.Command("sleep", "3600")
		must(t, g.Start(c))
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		cmds = append(cmds, c)
	}
	// As after a crash: a new manager for the same place.
	m2, err := Detect(m.Path(), testLogger(t))
	must(t, err)
	killed, err := m2.Sub("nexlets").CleanupStale("old")
	must(t, err)
	if killed != 2 {
		t.Fatalf("killed %d", killed)
	}
	for _, c := range cmds[:2] {
		_ = c.Wait()
	}
	if alive(cmds[2].Process.Pid) != true {
		t.Fatal("cleanup of old/ killed a process outside it")
	}
	for _, c := range []string{"memory", "cpu", "pids"} {
		if _, err := os.Stat(filepath.Join(m.hierDir(c), "nexlets/old")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: stale group left: %v", c, err)
		}
	}
	killed, err = m2.Sub("nexlets").CleanupStale("")
	must(t, err)
	if killed != 1 {
		t.Fatalf("killed %d", killed)
	}
	if _, err := os.Stat(filepath.Join(m.hierDir("memory"), "nexlets")); err != nil {
		t.Fatalf("cleanup removed the root: %v", err)
	}
}

func TestNoneMode(t *testing.T) {
	m := Disabled("no cgroups in this test", testLogger(t))
	if m.Mode() != ModeNone || len(m.Enforced()) != 0 || m.Path() != "" {
		t.Fatalf("%s %v %q", m.Mode(), m.Enforced(), m.Path())
	}
	g, err := m.Create("x", Limits{MemoryMax: 1 << 20})
	must(t, err)
	pidFile := filepath.Join(t.TempDir(), "bg")
	cmd := exec.Command("/bin/sh", "-c", `sleep 3600 & echo $! > `+pidFile+`.tmp; mv `+pidFile+`.tmp `+pidFile+`; exec sleep 3600`)
	must(t, g.Start(cmd))
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	if !cmd.SysProcAttr.Setpgid || cmd.SysProcAttr.Pdeathsig == 0 {
		t.Fatalf("attrs %+v", cmd.SysProcAttr)
	}
	testkit.Eventually(t, "the grandchild", func() bool { _, err := os.Stat(pidFile); return err == nil })
	bg, _ := strconv.Atoi(readTrim(t, pidFile))
	testkit.Eventually(t, "procs = child and grandchild", func() bool {
		pids, err := g.Procs()
		must(t, err)
		return slices.Equal(pids, sorted(cmd.Process.Pid, bg))
	})
	must(t, g.Remove())
	<-waited
	if alive(bg) {
		t.Fatal("grandchild survived")
	}
	if n, err := m.CleanupStale(""); n != 0 || err != nil {
		t.Fatal(n, err)
	}
}

// TestNoneModeErrorsNameTheGroup: in none mode a group has no directory (Path is ""),
// and its errors read "cgroup : ..." (a kill's surviving processes, a Place). Now they
// name the group below the manager's root, and say it has no cgroup.
func TestNoneModeErrorsNameTheGroup(t *testing.T) {
	g, err := Disabled("no cgroups in this test", testLogger(t)).Sub("nexlets/native").Create("w1", Limits{})
	must(t, err)
	err = g.Place(os.Getpid())
	want := "cgroup /nexlets/native/w1 (none mode: no cgroup, its processes' own process groups): no cgroups to place pid"
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("Place in none mode: %v, want an error starting %q", err, want)
	}
}

func TestParse(t *testing.T) {
	mi := `24 1 0:22 / /sys rw - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw,memory
41 31 0:38 /nexd /mnt/my\040cg rw shared:9 - cgroup2 cgroup2 rw,nsdelegate
`
	got := parseMountinfo([]byte(mi))
	want := []mount{
		{root: "/", point: "/sys/fs/cgroup/cpu,cpuacct", fstype: "cgroup", superOpts: []string{"rw", "cpu", "cpuacct"}},
		{root: "/", point: "/sys/fs/cgroup/memory", fstype: "cgroup", superOpts: []string{"rw", "memory"}, readOnly: true},
		{root: "/nexd", point: "/mnt/my cg", fstype: "cgroup2", superOpts: []string{"rw", "nsdelegate"}},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("mounts\n%v\nwant\n%v", got, want)
	}
	u, v1 := parseSelfCgroup([]byte("12:cpu,cpuacct:/a\n4:memory:/b\n1:name=systemd:/c\n0::/system.slice/x.service\n"))
	if u != "/system.slice/x.service" || v1["cpu"] != "/a" || v1["cpuacct"] != "/a" || v1["memory"] != "/b" {
		t.Fatalf("%q %v", u, v1)
	}
	for _, tc := range []struct {
		l  Limits
		ok bool
	}{
		{Limits{}, true},
		{Limits{MemoryMax: 1, MemoryHigh: 1, CPUMax: 0.01, PidsMax: 1}, true},
		{Limits{MemoryMax: -1}, false},
		{Limits{MemoryHigh: -1}, false},
		{Limits{CPUMax: -0.5}, false},
		{Limits{CPUMax: 0.001}, false},
		{Limits{PidsMax: -2}, false},
	} {
		if err := tc.l.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: %v", tc.l, err)
		}
	}
}

// TestV1RemoveOwnRoot: a detected v1 root (nexd/<instance>) is removed, in every
// hierarchy, once nothing runs below it (as after a clean stop: the empty nexlets and
// workloads groups go with it); while a process runs below it (a workload left for
// live_restore) nothing is removed or killed; an explicit root is never removed.
func TestV1RemoveOwnRoot(t *testing.T) {
	for _, c := range []string{"memory", "cpu", "pids"} {
		if !writable(filepath.Join("/sys/fs/cgroup", c)) {
			t.Skipf("no writable cgroup v1 %s hierarchy here", c)
		}
	}
	instance := fmt.Sprintf("test-own-root-%d", rand.Int64())
	m, err := DetectFor("", instance, testLogger(t))
	must(t, err)
	if m.Mode() != ModeV1 {
		t.Skipf("detection chose %s here, not cgroup v1", m.Mode())
	}
	t.Cleanup(func() { _ = m.group("").Remove() })
	var roots []string
	for _, h := range m.hiers {
		roots = append(roots, h.Root)
		if filepath.Base(h.Root) != instance || filepath.Base(filepath.Dir(h.Root)) != v1GroupName {
			t.Fatalf("detected root %s, want %s/%s in its hierarchy", h.Root, v1GroupName, instance)
		}
	}
	g, err := m.Sub("workloads").Create("w1", Limits{})
	must(t, err)
	c := exec.Command("sleep", "3600")
	must(t, g.Start(c))
	t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
	_, err = m.Sub("nexlets").Create("native", Limits{})
	must(t, err)

	if err := m.RemoveOwnRoot(); err == nil || !strings.Contains(err.Error(), "left in place") {
		t.Fatalf("RemoveOwnRoot with a workload running: %v, want an error saying the root is left", err)
	}
	if !alive(c.Process.Pid) {
		t.Fatal("RemoveOwnRoot killed the workload")
	}
	for _, r := range roots {
		if _, err := os.Stat(filepath.Join(r, "workloads", "w1")); err != nil {
			t.Fatalf("RemoveOwnRoot removed a group with a process: %v", err)
		}
	}

	// What a clean stop leaves: the nexlets and workloads groups, empty.
	for _, sub := range []string{"nexlets", "workloads"} {
		_, err := m.Sub(sub).CleanupStale("")
		must(t, err)
	}
	_ = c.Wait()
	for _, r := range roots {
		for _, sub := range []string{"nexlets", "workloads"} {
			if _, err := os.Stat(filepath.Join(r, sub)); err != nil {
				t.Fatalf("%s/%s: %v (the test expects the empty groups a stop leaves)", r, sub, err)
			}
		}
	}
	must(t, m.RemoveOwnRoot())
	for _, r := range roots {
		if _, err := os.Stat(r); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("root %s left after RemoveOwnRoot: %v", r, err)
		}
		if _, err := os.Stat(filepath.Dir(r)); err != nil {
			t.Errorf("the shared %s was removed: %v", filepath.Dir(r), err)
		}
	}

	// An explicit root is the admin's: never removed.
	ex := v1Root(t)
	must(t, ex.RemoveOwnRoot())
	if _, err := os.Stat(ex.Path()); err != nil {
		t.Fatalf("RemoveOwnRoot removed an explicit root: %v", err)
	}
}

// BenchmarkV1Create makes a new group as the nexlet's start makes its own (no limits
// but the ones configured: none here) and removes it off the clock.
func BenchmarkV1Create(b *testing.B) {
	m := v1Root(b)
	i := 0
	for b.Loop() {
		name := "b" + strconv.Itoa(i)
		i++
		g, err := m.Create(name, Limits{})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := g.Remove(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkV1Remove is a stopped workload's group removed by its tidy: a process ran in
// it and exited (made, started and waited for off the clock), then Remove on the clock.
func BenchmarkV1Remove(b *testing.B) {
	m := v1Root(b)
	i := 0
	for b.Loop() {
		b.StopTimer()
		name := "r" + strconv.Itoa(i)
		i++
		g, err := m.Create(name, Limits{})
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command("/bin/true")
		if err := g.Start(cmd); err != nil {
			b.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := g.Remove(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkV1WriteFile writes a limit to a real v1 group's interface file, as a pool
// group's entry (its thread's id into tasks) and a start's limits do.
func BenchmarkV1WriteFile(b *testing.B) {
	m := v1Root(b)
	g, err := m.Create("w", Limits{})
	if err != nil {
		b.Fatal(err)
	}
	var p string
	for _, h := range g.hiers {
		if h.has("pids") {
			p = filepath.Join(h.Root, "pids.max")
		}
	}
	if p == "" {
		b.Skip("no v1 pids hierarchy")
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := writeFile(p, "100"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkV1CleanupStaleEmpty is nexd's start on a node root nothing was left in: the
// nexlets' root (here with no group below it) read for leftovers of a crash.
func BenchmarkV1CleanupStaleEmpty(b *testing.B) {
	m := v1Root(b)
	if _, err := m.Create("nexlets", Limits{}); err != nil {
		b.Fatal(err)
	}
	nexlets := m.Sub("nexlets")
	for b.Loop() {
		if killed, err := nexlets.CleanupStale(""); err != nil || killed != 0 {
			b.Fatal(killed, err)
		}
	}
}

// earlynexlet.WarmAttach's move (the pre-started nexlet's cgroup warm-up) is one to
// where the process is already: a child placed in a group of this package's stays in
// that group in every hierarchy, and nothing else moves.
func TestWarmAttachMovesNothing(t *testing.T) {
	m := v1Root(t)
	g, err := m.Create("n/warm", Limits{PidsMax: 20})
	must(t, err)
	cmd := exec.Command("/bin/sleep", "3600")
	must(t, g.Start(cmd))
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	where := func() string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
		must(t, err)
		return string(b)
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	must(t, err)
	before := where()
	must(t, earlynexlet.WarmAttach(cmd.Process.Pid))
	if after := where(); after != before {
		t.Fatalf("moved:\n%s\nwas:\n%s", after, before)
	}
	if now, _ := os.ReadFile("/proc/self/cgroup"); string(now) != string(self) {
		t.Fatalf("the test process moved:\n%s\nwas:\n%s", now, self)
	}
	pids, err := g.Procs()
	must(t, err)
	if !slices.Equal(pids, []int{cmd.Process.Pid}) {
		t.Fatalf("group procs %v, want [%d]", pids, cmd.Process.Pid)
	}
	if err := earlynexlet.WarmAttach(1 << 30); err == nil {
		t.Fatal("no error for a pid that does not exist")
	}
}
