package supervise

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

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/testkit"
)

// recorder keeps log records for assertions.
type recorder struct {
	mu   sync.Mutex
	recs []rec
}

type rec struct {
	level slog.Level
	msg   string
	attrs map[string]any
}

type recHandler struct {
	r     *recorder
	attrs []slog.Attr
}

func (h recHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h recHandler) WithGroup(string) slog.Handler            { return h }
func (h recHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return recHandler{r: h.r, attrs: append(slices.Clone(h.attrs), as...)}
}
func (h recHandler) Handle(_ context.Context, r slog.Record) error {
	m := map[string]any{}
	for _, a := range h.attrs {
		m[a.Key] = a.Value.Any()
	}
	r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.Any(); return true })
	h.r.mu.Lock()
	h.r.recs = append(h.r.recs, rec{r.Level, r.Message, m})
	h.r.mu.Unlock()
	return nil
}

func (r *recorder) find(f func(rec) bool) []rec {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []rec
	for _, x := range r.recs {
		if f(x) {
			out = append(out, x)
		}
	}
	return out
}

func (r *recorder) dump(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, x := range r.recs {
		if i > 200 {
			t.Log("...")
			return
		}
		t.Logf("%s %q %v", x.level, x.msg, x.attrs)
	}
}

func newRecorder(t *testing.T) (*recorder, *slog.Logger) {
	r := &recorder{}
	t.Cleanup(func() {
		if t.Failed() {
			r.dump(t)
		}
	})
	return r, slog.New(recHandler{r: r})
}

// v1Nexlets gives a nexlets root in a unique group of this machine's v1 hierarchies,
// removed at the end; without them the test is skipped if need, else runs without cgroups.
func v1Nexlets(t *testing.T, need bool) (*cgroup.Manager, string) {
	t.Helper()
	for _, c := range []string{"memory", "cpu", "pids"} {
		if syscall.Access(filepath.Join("/sys/fs/cgroup", c), 2) != nil {
			if need {
				t.Skipf("no writable cgroup v1 %s hierarchy here", c)
			}
			return cgroup.Disabled("test without cgroups", nil), ""
		}
	}
	name := testkit.OwnedName(t, "nexd-test-")
	root := "/sys/fs/cgroup/memory/" + name
	m, err := cgroup.Detect(root, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := m.CleanupStale(""); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		for _, h := range []string{"memory", "cpu", "pids", "cpuacct"} {
			if err := syscall.Rmdir(filepath.Join("/sys/fs/cgroup", h, name)); err != nil && !errors.Is(err, syscall.ENOENT) {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	return m.Sub("nexlets"), root
}

// v2Nexlets gives a nexlets root in a unique group of the real cgroup2 hierarchy (no
// controllers on this machine, but clone3 placement, cgroup.kill and removal are real).
func v2Nexlets(t *testing.T) *cgroup.Manager {
	t.Helper()
	const unified = "/sys/fs/cgroup/unified"
	var fs syscall.Statfs_t
	if err := syscall.Statfs(unified, &fs); err != nil || fs.Type != 0x63677270 || syscall.Access(unified, 2) != nil {
		t.Skipf("no writable cgroup2 mount at %s", unified)
	}
	root := filepath.Join(unified, testkit.OwnedName(t, "nexd-test-"))
	m, err := cgroup.Detect(root, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := m.CleanupStale(""); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := syscall.Rmdir(root); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return m.Sub("nexlets")
}

func status(s *Supervisor, name string) Status {
	for _, st := range s.Statuses() {
		if st.Name == name {
			return st
		}
	}
	return Status{}
}

func waitState(t *testing.T, s *Supervisor, name string, want State) Status {
	t.Helper()
	var st Status
	testkit.Eventually(t, fmt.Sprintf("nexlet %s %s", name, want), func() bool { st = status(s, name); return st.State == want })
	return st
}

func stopAll(t *testing.T, s *Supervisor) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := s.Stop(ctx); err != nil {
		t.Errorf("stop: %v", err)
	}
}

// alive reports whether pid runs (a zombie waiting for its reaper does not).
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	testkit.Eventually(t, path, func() bool { _, err := os.Stat(path); return err == nil })
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func countLines(path string) int {
	b, _ := os.ReadFile(path)
	return len(strings.Fields(string(b)))
}

func TestCrashLoopBackoffFailedReset(t *testing.T) {
	cg, _ := v1Nexlets(t, false)
	r, log := newRecorder(t)
	var exits []ExitInfo
	var mu sync.Mutex
	s := New(Options{Cgroups: cg, RestartLimit: 4, Window: time.Hour, BackoffMin: 20 * time.Millisecond,
		BackoffMax: 10 * time.Second, Logger: log, OnExit: func(_ string, e ExitInfo) {
			mu.Lock()
			exits = append(exits, e)
			mu.Unlock()
		}})
	defer stopAll(t, s)
	dir := t.TempDir()
	healthy, starts := filepath.Join(dir, "healthy"), filepath.Join(dir, "starts")
	if err := s.Start(context.Background(), fakeSpec("crashy", "crash-unless", healthy, starts)); err != nil {
		t.Fatal(err)
	}
	st := waitState(t, s, "crashy", StateFailed)
	if st.Restarts != 4 || st.LastExit != "exit status 1" || st.PID != 0 {
		t.Fatalf("status %+v", st)
	}
	// The status line's count (READY=1 carries it) agrees with Statuses.
	if all, failed := s.Count(); all != 1 || failed != 1 {
		t.Fatalf("Count = %d nexlets, %d failed; want 1, 1", all, failed)
	}
	if n := countLines(starts); n != 5 {
		t.Fatalf("%d starts, want 5 (1 + 4 restarts)", n)
	}
	// The backoff grows with every restart.
	var delays []time.Duration
	for _, x := range r.find(func(x rec) bool { return x.msg == "nexlet exited, restarting" }) {
		delays = append(delays, x.attrs["backoff"].(time.Duration))
	}
	if len(delays) != 4 {
		t.Fatalf("backoffs %v", delays)
	}
	for i := 1; i < len(delays); i++ {
		if delays[i] <= delays[i-1] {
			t.Fatalf("backoff does not grow: %v", delays)
		}
	}
	if delays[0] < 20*time.Millisecond || delays[0] > 25*time.Millisecond {
		t.Fatalf("first backoff %v", delays[0])
	}
	if len(r.find(func(x rec) bool { return x.level == slog.LevelError && strings.Contains(x.msg, "restart limit") })) != 1 {
		t.Fatal("no ERROR line for the failed nexlet")
	}
	if len(r.find(func(x rec) bool {
		return x.msg == "crashing" && x.level == slog.LevelWarn && x.attrs["nexlet"] == "crashy"
	})) == 0 {
		t.Fatal("stderr not logged at WARN with nexlet attribute")
	}
	mu.Lock()
	if len(exits) != 5 || exits[0].Code != 1 || exits[0].Stopped {
		t.Fatalf("exits %+v", exits)
	}
	mu.Unlock()

	// Fixed, and reset: it runs again and stays up.
	if err := os.WriteFile(healthy, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Reset("crashy"); err != nil {
		t.Fatal(err)
	}
	st = waitState(t, s, "crashy", StateRunning)
	if st.Restarts != 0 || st.PID == 0 {
		t.Fatalf("after reset %+v", st)
	}
	testkit.Eventually(t, "healthy output", func() bool {
		return len(r.find(func(x rec) bool { return x.msg == "healthy" && x.level == slog.LevelInfo })) == 1
	})
	if err := s.Reset("nope"); err == nil {
		t.Fatal("reset of an unknown nexlet accepted")
	}
}

func TestRestartLimitZeroStartsOnce(t *testing.T) {
	cg, _ := v1Nexlets(t, false)
	s := New(Options{Cgroups: cg, RestartLimit: 0, BackoffMin: time.Millisecond})
	defer stopAll(t, s)
	dir := t.TempDir()
	starts := filepath.Join(dir, "starts")
	if err := s.Start(context.Background(), fakeSpec("once", "crash-unless", filepath.Join(dir, "no"), starts)); err != nil {
		t.Fatal(err)
	}
	st := waitState(t, s, "once", StateFailed)
	if st.Restarts != 0 || countLines(starts) != 1 {
		t.Fatalf("status %+v, %d starts", st, countLines(starts))
	}
	// A reload raising the limit applies from the next exit: a reset restarts it.
	s.SetRestartLimit(1)
	if err := s.Reset("once"); err != nil {
		t.Fatal(err)
	}
	waitState(t, s, "once", StateFailed)
	testkit.Eventually(t, "two more starts", func() bool { return countLines(starts) == 3 })
}

func TestOrphansKilledAndCgroupRemoved(t *testing.T) {
	for _, mode := range []string{"v1", "v2", "none"} {
		t.Run(mode, func(t *testing.T) {
			cg := cgroup.Disabled("test", nil)
			switch mode {
			case "v1":
				cg, _ = v1Nexlets(t, true)
			case "v2":
				cg = v2Nexlets(t)
			}
			s := New(Options{Cgroups: cg, RestartLimit: 0})
			defer stopAll(t, s)
			pidFile := filepath.Join(t.TempDir(), "orphan")
			if err := s.Start(context.Background(), fakeSpec("forker", "fork-orphan", pidFile)); err != nil {
				t.Fatal(err)
			}
			orphan := readPid(t, pidFile)
			st := waitState(t, s, "forker", StateFailed)
			if st.LastExit != "exit status 0" {
				t.Fatalf("status %+v", st)
			}
			testkit.Eventually(t, "the orphan to die", func() bool { return !alive(orphan) })
			if _, err := os.Stat(filepath.Join(cg.Path(), "forker")); mode != "none" && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("cgroup left: %v", err)
			}
			if mode != "v1" {
				return
			}
			for _, h := range []string{"memory", "cpu", "pids"} {
				dir := filepath.Join(strings.Replace(cg.Path(), "/memory/", "/"+h+"/", 1), "forker")
				if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("cgroup %s left: %v", dir, err)
				}
			}
		})
	}
}

func TestIgnoredSIGTERMKilledAtGrace(t *testing.T) {
	cg, _ := v1Nexlets(t, false)
	var exit ExitInfo
	s := New(Options{Cgroups: cg, Grace: 500 * time.Millisecond, OnExit: func(_ string, e ExitInfo) { exit = e }})
	dir := t.TempDir()
	ready, term := filepath.Join(dir, "ready"), filepath.Join(dir, "term")
	if err := s.Start(context.Background(), fakeSpec("stubborn", "ignore-term", ready, term)); err != nil {
		t.Fatal(err)
	}
	pid := readPid(t, ready)
	stopAll(t, s)
	if _, err := os.Stat(term); err != nil {
		t.Fatalf("SIGTERM was not delivered first: %v", err)
	}
	if alive(pid) {
		t.Fatal("nexlet survived stop")
	}
	st := status(s, "stubborn")
	if st.State != StateStopped || st.LastExit != "signal: killed" || !exit.Stopped {
		t.Fatalf("status %+v exit %+v", st, exit)
	}
	if err := s.Start(context.Background(), Spec{Name: "late", Path: os.Args[0]}); err == nil {
		t.Fatal("start after stop accepted")
	}
}

func TestOOMReported(t *testing.T) {
	cg, _ := v1Nexlets(t, true)
	var mu sync.Mutex
	var exit ExitInfo
	s := New(Options{Cgroups: cg, RestartLimit: 0, OnExit: func(_ string, e ExitInfo) { mu.Lock(); exit = e; mu.Unlock() }})
	defer stopAll(t, s)
	spec := fakeSpec("hog", "oom")
	spec.Limits = cgroup.Limits{MemoryMax: 128 << 20}
	if err := s.Start(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	st := waitState(t, s, "hog", StateFailed)
	mu.Lock()
	defer mu.Unlock()
	if st.LastExit != "oom-killed" || !exit.OOM || exit.Code != -1 {
		t.Fatalf("status %+v exit %+v", st, exit)
	}
}

func TestStaleCgroupsCleanedAfterKill9(t *testing.T) {
	cg, root := v1Nexlets(t, true)
	ready := filepath.Join(t.TempDir(), "ready")
	nexd := exec.Command(os.Args[0], "fake-nexd", root, ready)
	nexd.Stderr = os.Stderr
	if err := nexd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := readPid(t, ready)
	if err := nexd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = nexd.Wait()
	if !alive(pid) {
		t.Fatal("the orphaned nexlet died with its nexd: nothing left to clean up")
	}
	s := New(Options{Cgroups: cg})
	defer stopAll(t, s)
	if err := s.Start(context.Background(), fakeSpec("b", "block")); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Fatal("the stale nexlet still runs")
	}
	if _, err := os.Stat(filepath.Join(cg.Path(), "a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale cgroup left: %v", err)
	}
}

// openFDs lists this process's descriptors as "number target" (readlink of
// /proc/self/fd/N), leaving out the listing's own directory and the Go runtime's
// netpoller (epoll, eventfd: opened once, on first use).
func openFDs(t *testing.T) map[string]bool {
	t.Helper()
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, n := range names {
		if fd, _ := strconv.Atoi(n); uintptr(fd) == d.Fd() {
			continue
		}
		l, err := os.Readlink("/proc/self/fd/" + n)
		if err != nil || l == "anon_inode:[eventpoll]" || l == "anon_inode:[eventfd]" {
			continue // closed meanwhile, or the runtime's
		}
		out[n+" "+l] = true
	}
	return out
}

// TestNoFDLeakOver100Restarts: what the supervisor opens per start (output pipes or
// FIFOs, pidfds, sockets) is closed again. A leak is a descriptor open after that was
// not before (same number, same target); one that closed meanwhile (an earlier test's,
// in this process) is not. Descriptors closed asynchronously get a few seconds.
func TestNoFDLeakOver100Restarts(t *testing.T) {
	cg, _ := v1Nexlets(t, false)
	before := openFDs(t)
	s := New(Options{Cgroups: cg, RestartLimit: 1000, Window: time.Hour, BackoffMin: time.Millisecond, BackoffMax: 2 * time.Millisecond})
	stopped := false
	defer func() {
		if !stopped {
			stopAll(t, s)
		}
	}()
	// /bin/true, not the race-built test binary: its start cost ~0.4 s at load 16, and
	// 100 of them outlasted the wait under make test's load; what leaks is the parent's.
	if err := s.Start(context.Background(), Spec{Name: "quick", Path: "/bin/true"}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	defer func() { t.Logf("%d restarts in %s", status(s, "quick").Restarts, time.Since(t0)) }()
	testkit.Eventually(t, "100 restarts", func() bool { return status(s, "quick").Restarts >= 100 })
	stopAll(t, s)
	stopped = true
	var leaked []string
	testkit.WaitFor(5*time.Second, func() bool {
		leaked = leaked[:0]
		for fd := range openFDs(t) {
			if !before[fd] {
				leaked = append(leaked, fd)
			}
		}
		return len(leaked) == 0
	})
	if len(leaked) > 0 {
		slices.Sort(leaked)
		t.Fatalf("%d fds open after 100 restarts that were not before: %q", len(leaked), leaked)
	}
}

func TestChildHygiene(t *testing.T) {
	cg, _ := v1Nexlets(t, false)
	for k, v := range map[string]string{"NOTIFY_SOCKET": "/run/notify", "LISTEN_FDS": "1", "LISTEN_PID": "1",
		"WATCHDOG_USEC": "1000", "INVOCATION_ID": "abc", "NEXD_SECRET": "hunter2"} {
		t.Setenv(k, v)
	}
	r, log := newRecorder(t)
	s := New(Options{Cgroups: cg, Logger: log, Env: func(name string) map[string]string {
		return map[string]string{"NEX_AGENT_NATS_URL": "nats://127.0.0.1:4222", "NEX_AGENT_NAME": name}
	}})
	defer stopAll(t, s)
	envFile := filepath.Join(t.TempDir(), "env")
	spec := fakeSpec("clean", "env", envFile)
	spec.Env["A"], spec.Env["B"], spec.Env["NOTIFY_SOCKET"] = "1", "two words", "configured anyway"

	if err := s.Start(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	readEnv := func() string {
		testkit.Eventually(t, "env dump", func() bool { _, err := os.Stat(envFile); return err == nil })
		b, _ := os.ReadFile(envFile)
		return string(b)
	}
	envText, limits, _ := strings.Cut(readEnv(), "\n--\n")
	env := map[string]string{}
	for l := range strings.SplitSeq(envText, "\n") {
		k, v, _ := strings.Cut(l, "=")
		env[k] = v
	}
	var keys []string
	for k := range env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"A", "B", "GORACE", EnvCgroup, "NEX_AGENT_NAME", "NEX_AGENT_NATS_URL"}; !slices.Equal(keys, want) {
		t.Fatalf("child env keys %v, want %v", keys, want)
	}
	if env["B"] != "two words" || env["NEX_AGENT_NAME"] != "clean" {
		t.Fatalf("env %v", env)
	}
	if len(r.find(func(x rec) bool {
		return x.msg == "nexlet environment variable dropped" && x.attrs["var"] == "NOTIFY_SOCKET"
	})) == 0 {
		t.Fatal("dropping a configured NOTIFY_SOCKET was not logged")
	}
	// The nexlet can open the root of its workload groups (below its own group here,
	// without Options.Workloads).
	sub, err := cgroup.Attach(env[EnvCgroup], nil)
	if err != nil {
		t.Fatal(err)
	}
	if cg.Mode() != cgroup.ModeNone && sub.Path() != filepath.Join(cg.Path(), "clean", "workloads") {
		t.Fatalf("child cgroup %s", sub.Path())
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("nofile=%d/%d", lim.Max, lim.Max); strings.TrimSpace(limits) != want {
		t.Fatalf("child %s, want %s", strings.TrimSpace(limits), want)
	}
	// No descriptor leaks into the child: stdin /dev/null, stdout and stderr pipes, and
	// only the Go runtime's own descriptors beyond (its poller, and the cgroup CPU limit
	// files it watches for GOMAXPROCS).
	pid := status(s, "clean").PID
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		n, _ := strconv.Atoi(fd.Name())
		switch {
		case n == 0 && target == "/dev/null":
		case (n == 1 || n == 2) && strings.HasPrefix(target, "pipe:"):
		case n > 2 && (target == "anon_inode:[eventpoll]" || target == "anon_inode:[eventfd]" || strings.HasPrefix(target, "anon_inode:[pidfd")):
		case n > 2 && strings.HasPrefix(target, "/sys/fs/cgroup/") && slices.Contains([]string{"cpu.max", "cpu.cfs_quota_us", "cpu.cfs_period_us"}, filepath.Base(target)):
		default:
			t.Errorf("child fd %d -> %s", n, target)
		}
	}
}

func TestLogsLevelsAndRateLimit(t *testing.T) {
	r, log := newRecorder(t)
	s := New(Options{Cgroups: cgroup.Disabled("test", nil), RestartLimit: 0, Logger: log, LogRate: 5, LogBurst: 20})
	defer stopAll(t, s)
	const lines = 3000
	flood := filepath.Join(t.TempDir(), "flood")
	if err := s.Start(context.Background(), fakeSpec("chatty", "log", strconv.Itoa(lines), flood)); err != nil {
		t.Fatal(err)
	}
	classified := []string{"hello out", "plain err", "bad thing", "bracketed", "dbg"}
	testkit.Eventually(t, "the classified lines logged", func() bool {
		return len(r.find(func(x rec) bool {
			return slices.Contains(classified, x.msg) || strings.HasPrefix(x.msg, "xxxx")
		})) >= len(classified)+1
	})
	if err := os.WriteFile(flood, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitState(t, s, "chatty", StateFailed)
	one := func(msg string, level slog.Level) rec {
		t.Helper()
		got := r.find(func(x rec) bool { return x.msg == msg })
		if len(got) != 1 || got[0].level != level || got[0].attrs["nexlet"] != "chatty" {
			t.Fatalf("%q: %+v", msg, got)
		}
		return got[0]
	}
	one("hello out", slog.LevelInfo)
	one("plain err", slog.LevelWarn)
	one("bad thing", slog.LevelError)
	one("bracketed", slog.LevelError)
	if d := one("dbg", slog.LevelDebug); d.attrs["k"] != "v" {
		t.Fatalf("json attrs %v", d.attrs)
	}
	if long := r.find(func(x rec) bool { return strings.HasPrefix(x.msg, "xxxx") }); len(long) != 1 || len(long[0].msg) != maxLine {
		t.Fatalf("long line not truncated to %d", maxLine)
	}
	logged := len(r.find(func(x rec) bool { return strings.HasPrefix(x.msg, "line ") }))
	suppressed := 0
	for _, x := range r.find(func(x rec) bool { return x.msg == "nexlet output rate-limited" }) {
		suppressed += int(x.attrs["suppressed"].(int64))
	}
	if suppressed == 0 || logged >= lines/2 {
		t.Fatalf("not rate-limited: %d logged, %d suppressed", logged, suppressed)
	}
	// Every numbered line is either logged or counted (the burst covers the first ones).
	if logged+suppressed != lines {
		t.Fatalf("%d logged + %d suppressed != %d", logged, suppressed, lines)
	}
}

func TestStartErrors(t *testing.T) {
	s := New(Options{Cgroups: cgroup.Disabled("test", nil)})
	defer stopAll(t, s)
	ctx := context.Background()
	for _, spec := range []Spec{
		{Name: "", Path: "/bin/true"},
		{Name: "a/b", Path: "/bin/true"},
		{Name: "cgroup.procs", Path: "/bin/true"},
		{Name: "ok", Path: ""},
		{Name: "ok", Path: "/bin/true", Limits: cgroup.Limits{MemoryMax: -1}},
	} {
		if err := s.Start(ctx, spec); err == nil {
			t.Errorf("%+v accepted", spec)
		}
	}
	err := s.Start(ctx, Spec{Name: "missing", Path: "/nonexistent/nexlet"})
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing binary: %v", err)
	}
	st := waitState(t, s, "missing", StateFailed)
	if !strings.HasPrefix(st.LastExit, "start: ") {
		t.Fatalf("status %+v", st)
	}
	if err := s.Start(ctx, Spec{Name: "missing", Path: "/bin/true"}); err == nil {
		t.Fatal("duplicate name accepted")
	}
}

func TestBackoff(t *testing.T) {
	min, max := 100*time.Millisecond, 30*time.Second
	for _, tc := range []struct {
		n        int
		rnd      float64
		want     time.Duration
		wantHigh time.Duration
	}{
		{0, 0, 100 * time.Millisecond, 0},
		{0, 0.999, 0, 125 * time.Millisecond},
		{1, 0, 200 * time.Millisecond, 0},
		{3, 0.5, 900 * time.Millisecond, 0},
		{8, 0, 25600 * time.Millisecond, 0},
		{9, 0, 30 * time.Second, 0},
		{9, 0.9, 30 * time.Second, 0},
		{500, 0.5, 30 * time.Second, 0},
	} {
		got := backoff(tc.n, min, max, func() float64 { return tc.rnd })
		if tc.want != 0 && got != tc.want {
			t.Errorf("backoff(%d, %v) = %v, want %v", tc.n, tc.rnd, got, tc.want)
		}
		if tc.wantHigh != 0 && (got >= tc.wantHigh || got < min) {
			t.Errorf("backoff(%d, %v) = %v, want below %v", tc.n, tc.rnd, got, tc.wantHigh)
		}
	}
}

// TestParseLineNoDuplicateKeys: a nexlet's own stream and pid (slog's JSON or text
// output) must not repeat the keys nexd adds to the record.
func TestParseLineNoDuplicateKeys(t *testing.T) {
	for _, in := range []string{
		`{"level":"INFO","msg":"workload output","stream":"stdout","pid":42,"workload_id":"W1"}`,
		`time=t level=INFO msg="workload output" stream=stdout pid=42 workload_id=W1`,
	} {
		_, _, attrs := parseLine([]byte(in), slog.LevelWarn)
		got := map[string]any{}
		for i := 0; i+1 < len(attrs); i += 2 {
			got[attrs[i].(string)] = attrs[i+1]
		}
		for _, k := range []string{"stream", "pid", "nexlet"} {
			if _, dup := got[k]; dup {
				t.Errorf("%s: child attribute %q kept under nexd's own key: %v", in, k, got)
			}
		}
		if fmt.Sprint(got["nexlet_stream"]) != "stdout" || fmt.Sprint(got["nexlet_pid"]) != "42" || got["workload_id"] != "W1" {
			t.Errorf("%s: attributes %v", in, got)
		}
	}
}

func TestParseLine(t *testing.T) {
	for _, tc := range []struct {
		in    string
		def   slog.Level
		level slog.Level
		msg   string
	}{
		{"plain", slog.LevelInfo, slog.LevelInfo, "plain"},
		{"plain", slog.LevelWarn, slog.LevelWarn, "plain"},
		{"<7>dbg", slog.LevelInfo, slog.LevelDebug, "dbg"},
		{"<4>w", slog.LevelInfo, slog.LevelWarn, "w"},
		{"<6>i", slog.LevelWarn, slog.LevelInfo, "i"},
		{"<0>emerg", slog.LevelInfo, slog.LevelError, "emerg"},
		{"[warn] x", slog.LevelInfo, slog.LevelWarn, "x"},
		{"ERROR: y", slog.LevelInfo, slog.LevelError, "y"},
		{"note: not a level", slog.LevelInfo, slog.LevelInfo, "note: not a level"},
		{`{"level":"WARN","msg":"j"}`, slog.LevelInfo, slog.LevelWarn, "j"},
		{`{"no":"msg"}`, slog.LevelInfo, slog.LevelInfo, `{"no":"msg"}`},
		{`time=2026-01-02T03:04:05Z level=INFO msg="echo nexlet registered" node=N1`, slog.LevelWarn, slog.LevelInfo, "echo nexlet registered"},
		{`level=ERROR msg=boom err="a \"b\""`, slog.LevelInfo, slog.LevelError, "boom"},
		{`time=x msg=no-level`, slog.LevelWarn, slog.LevelWarn, `time=x msg=no-level`},
	} {
		level, msg, _ := parseLine([]byte(tc.in), tc.def)
		if level != tc.level || msg != tc.msg {
			t.Errorf("parseLine(%q) = %v %q, want %v %q", tc.in, level, msg, tc.level, tc.msg)
		}
	}
}
