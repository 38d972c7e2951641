package cgroup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func readTrim(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// fakeV2 detects a delegated v2 subtree in a fake cgroupfs, as under systemd.
func fakeV2(t *testing.T) (*Manager, *fakeFS, string) {
	t.Helper()
	f := newFakeFS(t, "system.slice/nexd.service", "cpuset cpu io memory hugetlb pids")
	return detectFake(t, f), f, filepath.Join(f.mount, "system.slice/nexd.service")
}

func detectFake(t *testing.T, f *fakeFS) *Manager {
	t.Helper()
	m, err := detect(fakeHost(t, "0::/system.slice/nexd.service\n", cg2Mountinfo(f.mount)), "", "", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	m.ops = f.ops()
	return m
}

func startSleep(t *testing.T) *exec.Cmd {
	t.Helper()
	c := exec.Command("sleep", "3600")
	must(t, c.Start())
	t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
	return c
}

func TestDetectFake(t *testing.T) {
	t.Run("delegated", func(t *testing.T) {
		m, _, root := fakeV2(t)
		if m.Mode() != ModeV2 || m.Path() != root || m.Reason() != "" {
			t.Fatalf("mode %s path %s reason %q", m.Mode(), m.Path(), m.Reason())
		}
		if !slices.Equal(m.Enforced(), []string{"memory", "cpu", "pids"}) {
			t.Fatalf("enforced %v", m.Enforced())
		}
	})
	t.Run("delegate-subgroup", func(t *testing.T) {
		f := newFakeFS(t, "system.slice/nexd.service/supervisor", "memory pids")
		m, err := detect(fakeHost(t, "0::/system.slice/nexd.service/supervisor\n", cg2Mountinfo(f.mount)), "", "", testLogger(t))
		must(t, err)
		if m.Mode() != ModeV2 || m.Path() != filepath.Join(f.mount, "system.slice/nexd.service") {
			t.Fatalf("mode %s path %s", m.Mode(), m.Path())
		}
		if !slices.Equal(m.Enforced(), []string{"memory", "pids"}) || !strings.Contains(m.Reason(), "cpu") {
			t.Fatalf("enforced %v reason %q", m.Enforced(), m.Reason())
		}
	})
	t.Run("root-cgroup-refused", func(t *testing.T) {
		f := newFakeFS(t, "x", "memory cpu pids")
		m, err := detect(fakeHost(t, "0::/\n", cg2Mountinfo(f.mount)), "", "", testLogger(t))
		must(t, err)
		if m.Mode() != ModeNone || !strings.Contains(m.Reason(), "root of the cgroup v2 hierarchy") {
			t.Fatalf("mode %s reason %q", m.Mode(), m.Reason())
		}
	})
	t.Run("v1-hierarchies", func(t *testing.T) {
		d := t.TempDir()
		var mi strings.Builder
		for i, h := range []string{"memory", "cpu,cpuacct", "pids", "devices"} {
			must(t, os.Mkdir(filepath.Join(d, h), 0o755))
			fmt.Fprintf(&mi, "%d 31 0:%d / %s rw,relatime - cgroup cgroup rw,%s\n", 32+i, 29+i, filepath.Join(d, h), h)
		}
		mi.WriteString(cg2Mountinfo(filepath.Join(d, "unified-missing")))
		m, err := detect(fakeHost(t, "4:memory:/\n0::/\n", mi.String()), "", "", testLogger(t))
		must(t, err)
		if m.Mode() != ModeV1 || !slices.Equal(m.Enforced(), []string{"memory", "cpu", "pids"}) {
			t.Fatalf("mode %s enforced %v reason %q", m.Mode(), m.Enforced(), m.Reason())
		}
		var names []string
		for _, h := range m.hiers {
			names = append(names, h.Name)
			if h.Root != filepath.Join(h.Mount, "nexd") {
				t.Errorf("hierarchy %s root %s", h.Name, h.Root)
			}
			if _, err := os.Stat(h.Root); err != nil {
				t.Error(err)
			}
		}
		if !slices.Equal(names, []string{"memory", "cpu,cpuacct", "pids"}) {
			t.Fatalf("hierarchies %v", names)
		}
	})
	t.Run("nothing", func(t *testing.T) {
		m, err := detect(fakeHost(t, "0::/\n", ""), "", "", testLogger(t))
		must(t, err)
		if m.Mode() != ModeNone || m.Reason() == "" || len(m.Enforced()) != 0 {
			t.Fatalf("mode %s reason %q", m.Mode(), m.Reason())
		}
	})
	t.Run("explicit-root-not-cgroupfs", func(t *testing.T) {
		_, err := detect(fakeHost(t, "0::/\n", ""), t.TempDir(), "", testLogger(t))
		if err == nil || !strings.Contains(err.Error(), "--cgroup-root") {
			t.Fatalf("err %v", err)
		}
		if _, err := detect(fakeHost(t, "0::/\n", ""), "relative/path", "", testLogger(t)); err == nil {
			t.Fatal("relative root accepted")
		}
	})
}

func TestV2EnterSupervisorAndCreate(t *testing.T) {
	m, f, root := fakeV2(t)
	other := startSleep(t)
	must(t, os.WriteFile(filepath.Join(root, "cgroup.procs"),
		fmt.Appendf(nil, "%d\n%d\n", os.Getpid(), other.Process.Pid), 0o644))

	// Before nexd left the root, the kernel refuses controllers there.
	if _, err := m.Create("nexlets/early", Limits{}); err == nil || !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("create before EnterSupervisor: %v", err)
	}
	must(t, m.EnterSupervisor(context.Background(), nil))
	if got := readTrim(t, filepath.Join(root, "cgroup.procs")); got != "" {
		t.Fatalf("root still holds processes %q", got)
	}
	want := fmt.Sprintf("%d\n%d", os.Getpid(), other.Process.Pid)
	if got := readTrim(t, filepath.Join(root, "supervisor/cgroup.procs")); got != want {
		t.Fatalf("supervisor/cgroup.procs %q, want %q", got, want)
	}
	if got := fields(filepath.Join(root, "cgroup.subtree_control")); !sameSet(got, []string{"memory", "cpu", "pids"}) {
		t.Fatalf("root subtree_control %v", got)
	}
	if !slices.Equal(m.Enforced(), []string{"memory", "cpu", "pids"}) {
		t.Fatalf("enforced %v", m.Enforced())
	}

	nexlets := m.Sub("nexlets")
	l := Limits{MemoryMax: 64 << 20, MemoryHigh: 48 << 20, CPUMax: 0.5, PidsMax: 100}
	g, err := nexlets.Create("a", l)
	must(t, err)
	ga := filepath.Join(root, "nexlets/a")
	if g.Path() != ga {
		t.Fatalf("path %s", g.Path())
	}
	for file, want := range map[string]string{"memory.max": "67108864", "memory.high": "50331648",
		"cpu.max": "50000 100000", "pids.max": "100"} {
		if got := readTrim(t, filepath.Join(ga, file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
	if got := fields(filepath.Join(root, "nexlets/cgroup.subtree_control")); !sameSet(got, []string{"memory", "cpu", "pids"}) {
		t.Fatalf("nexlets subtree_control %v", got)
	}
	// The nexlet process goes one level down; the nexlet's own workloads beside it.
	if _, err := nexlets.Sub("a").Create("nexlet", Limits{}); err != nil {
		t.Fatal(err)
	}
	if got := fields(filepath.Join(ga, "cgroup.subtree_control")); !sameSet(got, []string{"memory", "cpu", "pids"}) {
		t.Fatalf("a/subtree_control %v", got)
	}
	// Reuse resets unset limits.
	_, err = nexlets.Create("a", Limits{MemoryMax: 32 << 20})
	must(t, err)
	for file, want := range map[string]string{"memory.max": "33554432", "memory.high": "max", "cpu.max": "max", "pids.max": "max"} {
		if got := readTrim(t, filepath.Join(ga, file)); got != want {
			t.Errorf("after reuse %s = %q, want %q", file, got, want)
		}
	}
	// Order: a parent's controllers are enabled before its child exists.
	log := f.log()
	idx := func(s string) int { return slices.Index(log, s) }
	if i, j := idx("system.slice/nexd.service/nexlets/cgroup.subtree_control=+memory +cpu +pids"),
		idx("system.slice/nexd.service/nexlets/a/memory.max=67108864"); i < 0 || j < 0 || i > j {
		t.Fatalf("write order wrong (%d, %d): %v", i, j, log)
	}
	if _, err := nexlets.Create("bad", Limits{CPUMax: -1}); err == nil {
		t.Fatal("negative cpu accepted")
	}
}

// TestV2EnterSupervisorWaitsForSettle: another process in the root whose own write into
// the cgroup it read (the pre-started nexlet's warm-up, earlynexlet.WarmAttach) is still
// to come is not moved before that write: EnterSupervisor waits for settle. Without the
// wait the move came first, the held write (released here at the enabling, the worst
// moment) put the process back in the root, and the enabling failed with EBUSY: the node
// without limits.
func TestV2EnterSupervisorWaitsForSettle(t *testing.T) {
	m, f, root := fakeV2(t)
	nexlet := startSleep(t)
	pid := strconv.Itoa(nexlet.Process.Pid)
	must(t, os.WriteFile(filepath.Join(root, "cgroup.procs"),
		fmt.Appendf(nil, "%d\n%s\n", os.Getpid(), pid), 0o644))

	// The warm-up has read its cgroup (the root) and is held before its write, starved
	// for as long as it takes: until EnterSupervisor waits for it, or, without that
	// wait, until the enabling, the worst moment for it to land.
	release, warmed := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	go func() {
		defer close(warmed)
		<-release
		_ = f.write(filepath.Join(root, "cgroup.procs"), pid)
	}()
	t.Cleanup(func() { free(); <-warmed })
	var pendingAtEnable bool
	write := m.ops.write
	m.ops.write = func(p, val string) error {
		if p == filepath.Join(root, "cgroup.subtree_control") {
			select {
			case <-warmed:
			default:
				pendingAtEnable = true
				free()
				<-warmed
			}
		}
		return write(p, val)
	}

	settled := func(ctx context.Context) error {
		free() // the warm-up goes on once EnterSupervisor waits for it
		select {
		case <-warmed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := m.EnterSupervisor(context.Background(), settled); err != nil {
		t.Fatalf("EnterSupervisor: %v (warm-up pending at the enabling: %v; writes %v)", err, pendingAtEnable, f.log())
	}
	if pendingAtEnable {
		t.Fatalf("the controllers were enabled while the warm-up's write was pending: %v", f.log())
	}
	log := f.log()
	warm := slices.Index(log, "system.slice/nexd.service/cgroup.procs="+pid)
	move := slices.IndexFunc(log, func(s string) bool { return strings.HasPrefix(s, "system.slice/nexd.service/supervisor/cgroup.procs=") })
	if warm < 0 || move < 0 || warm > move {
		t.Fatalf("the warm-up's write (%d) not before the first move (%d): %v", warm, move, log)
	}
	if got := readTrim(t, filepath.Join(root, "cgroup.procs")); got != "" {
		t.Fatalf("root still holds processes %q", got)
	}
	if got := readTrim(t, filepath.Join(root, "supervisor/cgroup.procs")); got != fmt.Sprintf("%d\n%s", os.Getpid(), pid) {
		t.Fatalf("supervisor/cgroup.procs %q", got)
	}
	if !slices.Equal(m.Enforced(), []string{"memory", "cpu", "pids"}) || m.Reason() != "" {
		t.Fatalf("enforced %v reason %q", m.Enforced(), m.Reason())
	}

	// v1 and none mode move nothing and wait for nothing.
	for _, other := range []*Manager{Disabled("test", testLogger(t)), {mode: ModeV1, log: testLogger(t), ops: f.ops()}} {
		if err := other.EnterSupervisor(context.Background(), func(context.Context) error {
			t.Errorf("%s mode waited", other.Mode())
			return nil
		}); err != nil {
			t.Errorf("%s mode: %v", other.Mode(), err)
		}
	}
}

// TestV2EnterSupervisorSettleEnds: a settle that ends only with its context makes
// EnterSupervisor's error, naming the wait, with nothing written and nothing degraded.
func TestV2EnterSupervisorSettleEnds(t *testing.T) {
	m, f, _ := fakeV2(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := m.EnterSupervisor(ctx, func(ctx context.Context) error {
		<-ctx.Done()
		return fmt.Errorf("waiting for the warm-up: %w", ctx.Err())
	})
	if err == nil || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "waiting for the warm-up") {
		t.Fatalf("EnterSupervisor with an ended context: %v", err)
	}
	if log := f.log(); len(log) != 0 {
		t.Fatalf("writes before the wait ended: %v", log)
	}
	if !slices.Equal(m.Enforced(), []string{"memory", "cpu", "pids"}) || m.Reason() != "" {
		t.Fatalf("enforced %v reason %q", m.Enforced(), m.Reason())
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func TestV2StatsAndOOMKills(t *testing.T) {
	m, _, root := fakeV2(t)
	must(t, os.WriteFile(filepath.Join(root, "cgroup.procs"), nil, 0o644))
	must(t, m.EnterSupervisor(context.Background(), nil))
	g, err := m.Create("nexlets/x", Limits{MemoryMax: 1 << 20})
	must(t, err)
	d := g.Path()
	must(t, os.WriteFile(filepath.Join(d, "memory.events"), []byte("low 0\nhigh 4\nmax 9\noom 3\noom_kill 2\noom_group_kill 0\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(d, "memory.current"), []byte("123456\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(d, "cpu.stat"), []byte("usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(d, "pids.current"), []byte("3\n"), 0o644))
	n, err := g.OOMKills()
	must(t, err)
	if n != 2 {
		t.Fatalf("oom kills %d", n)
	}
	s, err := g.Stats()
	must(t, err)
	if s != (Stats{MemoryCurrent: 123456, MemoryMax: 1 << 20, CPUUsageNsec: 2500000, Pids: 3, OOMKills: 2}) {
		t.Fatalf("stats %+v", s)
	}
	must(t, os.WriteFile(filepath.Join(d, "memory.events"), []byte("oom_kill x\n"), 0o644))
	if _, err := g.OOMKills(); err == nil {
		t.Fatal("malformed memory.events accepted")
	}
}

func TestV2StartFallbackKillRemove(t *testing.T) {
	m, _, root := fakeV2(t)
	must(t, os.WriteFile(filepath.Join(root, "cgroup.procs"), nil, 0o644))
	must(t, m.EnterSupervisor(context.Background(), nil))
	g, err := m.Create("nexlets/y/nexlet", Limits{})
	must(t, err)
	// clone3 into a directory that is no cgroup fails (EBADF): the fallback moves the pid.
	cmd := exec.Command("sleep", "3600")
	must(t, g.Start(cmd))
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	if !cmd.SysProcAttr.Setpgid {
		t.Error("no process group")
	}
	pids, err := g.Procs()
	must(t, err)
	if !slices.Equal(pids, []int{cmd.Process.Pid}) {
		t.Fatalf("procs %v, want [%d]", pids, cmd.Process.Pid)
	}
	parent := m.Sub("nexlets").group("y")
	if pids, _ := parent.Procs(); !slices.Equal(pids, []int{cmd.Process.Pid}) {
		t.Fatalf("subtree procs %v", pids)
	}
	must(t, parent.Remove())
	select {
	case err := <-waited:
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("wait: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("process survived the group kill")
	}
	if _, err := os.Stat(filepath.Join(root, "nexlets/y")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("group not removed: %v", err)
	}
}

func TestV2CleanupStale(t *testing.T) {
	m, f, root := fakeV2(t)
	must(t, os.WriteFile(filepath.Join(root, "cgroup.procs"), nil, 0o644))
	must(t, m.EnterSupervisor(context.Background(), nil))
	nexlets := m.Sub("nexlets")
	var cmds []*exec.Cmd
	for _, rel := range []string{"old/nexlet", "old/workloads/w1", "other/nexlet"} {
		g, err := nexlets.Create(rel, Limits{})
		must(t, err)
		c := startSleep(t)
		must(t, m.ops.write(filepath.Join(g.Path(), "cgroup.procs"), strconv.Itoa(c.Process.Pid)))
		cmds = append(cmds, c)
	}
	// A fresh manager, as after a restart of nexd.
	m2 := detectFake(t, f)
	killed, err := m2.Sub("nexlets").CleanupStale("old")
	must(t, err)
	if killed != 2 {
		t.Fatalf("killed %d", killed)
	}
	for _, c := range cmds[:2] {
		if err := c.Wait(); err == nil {
			t.Fatal("stale process exited cleanly?")
		}
	}
	if _, err := os.Stat(filepath.Join(root, "nexlets/old")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale group left: %v", err)
	}
	killed, err = m2.Sub("nexlets").CleanupStale("")
	must(t, err)
	if killed != 1 {
		t.Fatalf("killed %d", killed)
	}
	ents, _ := os.ReadDir(filepath.Join(root, "nexlets"))
	for _, e := range ents {
		if e.IsDir() {
			t.Fatalf("left %s", e.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(root, "nexlets")); err != nil {
		t.Fatalf("root removed: %v", err)
	}
	if n, err := m2.Sub("nexlets").CleanupStale("missing"); n != 0 || err != nil {
		t.Fatalf("missing: %d %v", n, err)
	}
}

func TestSpecAttach(t *testing.T) {
	m, _, root := fakeV2(t)
	must(t, os.WriteFile(filepath.Join(root, "cgroup.procs"), nil, 0o644))
	must(t, m.EnterSupervisor(context.Background(), nil))
	_, err := m.Create("nexlets/n/nexlet", Limits{})
	must(t, err)
	sub := m.Sub("nexlets/n")
	a, err := Attach(sub.Spec(), testLogger(t))
	must(t, err)
	if a.Mode() != ModeV2 || a.Path() != filepath.Join(root, "nexlets/n") || !slices.Equal(a.Enforced(), m.Enforced()) {
		t.Fatalf("attached %s %s %v", a.Mode(), a.Path(), a.Enforced())
	}
	if a.hiers[0].base != a.Path() {
		t.Fatalf("attached manager may write above its root: base %s", a.hiers[0].base)
	}
	for _, bad := range []string{"", "{", `{"mode":"v3"}`, `{"mode":"v2"}`, `{"mode":"v2","hierarchies":[{"name":"unified","mount":"/x","root":"/nonexistent/x"}]}`} {
		if _, err := Attach(bad, nil); err == nil {
			t.Errorf("Attach(%q) accepted", bad)
		}
	}
	n, err := Attach(Disabled("test", nil).Spec(), nil)
	must(t, err)
	if n.Mode() != ModeNone || n.Reason() != "test" {
		t.Fatalf("none: %s %q", n.Mode(), n.Reason())
	}
	// Sub never escapes its root.
	if p := m.Sub("../../etc").Path(); !strings.HasPrefix(p, root+"/") {
		t.Fatalf("sub escaped: %s", p)
	}
}

// TestV2RealKernel runs the v2 paths that need no controllers against the kernel: clone3
// into a real cgroup2 directory, cgroup.kill, rmdir.
func TestV2RealKernel(t *testing.T) {
	const unified = "/sys/fs/cgroup/unified"
	var fs unix.Statfs_t
	if err := unix.Statfs(unified, &fs); err != nil || fs.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Skipf("no cgroup2 mount at %s on this machine", unified)
	}
	if !writable(filepath.Join(unified, "cgroup.procs")) {
		t.Skipf("%s is not writable (not root?)", unified)
	}
	root := filepath.Join(unified, testkit.OwnedName(t, "nexd-test-"))
	m, err := Detect(root, testLogger(t))
	must(t, err)
	t.Cleanup(func() { _ = m.group("").Remove() })
	if m.Mode() != ModeV2 || m.Path() != root {
		t.Fatalf("mode %s path %s", m.Mode(), m.Path())
	}
	g, err := m.Create("nexlets/k/nexlet", Limits{MemoryMax: 1 << 30}) // not enforced without controllers
	must(t, err)
	cmd := exec.Command("/bin/sh", "-c", "sleep 3600 & exec sleep 3600")
	must(t, g.Start(cmd))
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	got := readTrim(t, fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	if !strings.Contains(got, "0::/"+filepath.Base(root)+"/nexlets/k/nexlet") {
		t.Fatalf("child not born in its cgroup: %s", got)
	}
	var pids []int
	for deadline := time.Now().Add(30 * time.Second); len(pids) < 2 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		pids, err = g.Procs()
		must(t, err)
	}
	if len(pids) != 2 {
		t.Fatalf("procs %v", pids)
	}
	must(t, m.Sub("nexlets").group("k").Remove())
	<-waited
	for _, p := range pids {
		if alive(p) {
			t.Errorf("pid %d survived", p)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "nexlets/k")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("not removed: %v", err)
	}
}
