package supervise

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/testkit"
)

// prestartFake pre-starts the test binary as the fake nexlet of spec.
func prestartFake(t *testing.T, spec Spec, env map[string]string) *Prestarted {
	t.Helper()
	p, err := Prestart(spec.Path, spec.Args, env, os.Stderr, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Discard)
	return p
}

// gone reports whether pid no longer exists, not even as a zombie: reaped.
func gone(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return os.IsNotExist(err)
}

// marked lists the processes whose environment holds NEXD_TEST_MARK=mark.
func marked(mark string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if strings.Contains(string(env), "NEXD_TEST_MARK="+mark+"\x00") {
			out = append(out, pid)
		}
	}
	return out
}

// TestPrestartedHandedOffInItsGroup: the first start of a nexlet takes the process
// pre-started for it instead of forking. What that process sees first thing after the
// hand-off (the fake nexlet's "selfcheck" reads it before anything else) is what a
// fork gives: it is in its own cgroup in every hierarchy, with the spec's limits, its
// oom_score_adj is set and its pid recorded; its environment is the start's (with the
// Env hook's credentials, its cgroup spec, and no hand-off variable); descriptors 1 and
// 2 are its output FIFOs and 3 its channel. The credentials never show in
// /proc/<pid>/environ, which keeps what the process was exec'd with. A preview sent
// while it waits reaches it before its hand-off; none is sent once the start took it.
// A restart forks.
func TestPrestartedHandedOffInItsGroup(t *testing.T) {
	cg, _ := v1Nexlets(t, true)
	dir := t.TempDir()
	check, records := filepath.Join(dir, "check"), filepath.Join(dir, "records")
	spec := fakeSpec("pre", "selfcheck", check, recordPath(records, "pre"))
	spec.Outlive = true
	spec.Limits = cgroup.Limits{MemoryMax: 256 << 20, PidsMax: 77}
	p := prestartFake(t, spec, map[string]string{"GORACE": "atexit_sleep_ms=0"})
	if err := p.Preview([]string{"NEX_NATIVE_STATE_DIR=/previewed"}); err != nil {
		t.Fatal(err)
	}
	const secret = "SUAEXAMPLESECRETSEED"
	ch, chPeer, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	s := New(Options{Cgroups: cg, RecordDir: records, FIFODir: filepath.Join(dir, "fifos"), Prestarted: p,
		NexletOOMScoreAdj: 321, RestartLimit: 5, BackoffMin: time.Millisecond,
		Env: func(string) map[string]string {
			return map[string]string{"NEX_AGENT_NATS_USER_SEED": secret}
		},
		Channel: func(string) *os.File { return chPeer }})
	defer stopAll(t, s)
	if err := s.Start(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	if got := status(s, "pre").PID; got != p.Pid() {
		t.Fatalf("the nexlet runs as pid %d, not the pre-started %d", got, p.Pid())
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the self-check", func() bool { _, err := os.Stat(check); return err == nil })
	b, _ := os.ReadFile(check)
	got := string(b)
	// Without Options.Workloads: the limits on <name>, the process in <name>/nexlet.
	group := strings.TrimPrefix(filepath.Join(cg.Path(), "pre"), "/sys/fs/cgroup/memory")
	in := map[string]string{} // controller -> group, from /proc/self/cgroup
	for l := range strings.SplitSeq(got, "\n") {
		if f := strings.SplitN(l, ":", 3); len(f) == 3 {
			for c := range strings.SplitSeq(f[1], ",") {
				in[c] = f[2]
			}
		}
	}
	for _, h := range []string{"memory", "pids", "cpu"} {
		if in[h] != group+"/nexlet" {
			t.Errorf("in %s group %q first thing, want %s/nexlet:\n%s", h, in[h], group, got)
		}
	}
	for _, want := range []string{"oom_score_adj <nil>\n321\n", fmt.Sprintf(`"pid":%d`, p.Pid()),
		"NEX_AGENT_NATS_USER_SEED=" + secret + "\n", EnvCgroup + "=", "== fd1 " + filepath.Join(dir, "fifos", "pre.stdout"),
		"== fd2 " + filepath.Join(dir, "fifos", "pre.stderr"), "== fd3 pipe:", "PREVIEW_NEX_NATIVE_STATE_DIR=/previewed\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("self-check lacks %q:\n%s", want, got)
		}
	}
	if err := p.Preview([]string{"K=V"}); err == nil {
		t.Error("a preview was sent after the start took the process")
	}
	if strings.Contains(got, EnvHandoff) {
		t.Errorf("the hand-off variable is still in the environment:\n%s", got)
	}
	for file, want := range map[string]string{"memory.limit_in_bytes": strconv.Itoa(256 << 20), "pids.max": "77"} {
		h := strings.Split(file, ".")[0]
		v, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", h, group, file))
		if err != nil || strings.TrimSpace(string(v)) != want {
			t.Errorf("%s of its group: %q %v, want %s", file, v, err, want)
		}
	}
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(environ), secret) {
		t.Errorf("the credentials show in /proc/<pid>/environ: %q", environ)
	}
	// Its first output goes through the FIFO, as a forked nexlet's.
	testkit.EventuallyWithin(t, 10*time.Second, "its stdout read", func() bool {
		s.mu.Lock()
		n := s.nexlets["pre"]
		s.mu.Unlock()
		return n.read.Load() > 0
	})
	// A restart forks: a new pid, the credentials in its exec environment.
	os.Remove(check)
	if err := s.Reset("pre"); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the restarted nexlet's self-check", func() bool { _, err := os.Stat(check); return err == nil })
	// The pid it found itself running as: a forked child can write its check before
	// the supervisor has noted the pid (its status shows none until then).
	b, _ = os.ReadFile(check)
	var pid int
	if _, self, ok := strings.Cut(string(b), "\n== self "); ok {
		pid, _ = strconv.Atoi(strings.TrimSpace(self))
	}
	if pid == p.Pid() || pid == 0 {
		t.Fatalf("the restart runs pid %d (pre-started %d)", pid, p.Pid())
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the restarted nexlet's pid in its status", func() bool {
		st := status(s, "pre")
		return st.PID == pid && st.State == StateRunning
	})
	environ, _ = os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if !strings.Contains(string(environ), secret) || strings.Contains(string(environ), EnvHandoff) {
		t.Errorf("the restart was not a fork: environ %q", environ)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the pre-started process reaped", func() bool { return gone(p.Pid()) })
}

// TestPrestartedDiesWithItsNexd: a nexd killed (kill -9) before it handed the
// pre-started nexlet its start leaves no process behind: the hand-off pair's end
// closes with nexd and the waiting process exits. Counted by the mark in its
// environment, before (one) and after (none).
func TestPrestartedDiesWithItsNexd(t *testing.T) {
	mark := strconv.FormatUint(rand.Uint64(), 36)
	ready := filepath.Join(t.TempDir(), "ready")
	nexd := exec.Command(os.Args[0], "fake-nexd-prestart", ready, mark)
	nexd.Stderr = os.Stderr
	if err := nexd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := readPid(t, ready)
	// Let it reach its main and wait there, as well as catching it still in its runtime
	// start (the other half of the runs).
	if rand.IntN(2) == 0 {
		time.Sleep(500 * time.Millisecond)
	}
	if got := marked(mark); len(got) != 1 || got[0] != pid {
		t.Fatalf("pre-started processes %v, want [%d]", got, pid)
	}
	if err := nexd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = nexd.Wait()
	testkit.EventuallyWithin(t, 30*time.Second, "the pre-started nexlet gone with its nexd", func() bool {
		return len(marked(mark)) == 0 && !alive(pid)
	})
}

// TestPrestartedDiscarded: a pre-started process that no start takes is killed and
// reaped, whichever way it goes unused: a start of another nexlet (it forks; Stop
// discards the process), a start whose environment sets a runtime variable otherwise,
// or whose group has a CPU limit (its runtime sized GOMAXPROCS by nexd's group: it
// forks at once), an adoption of the nexlet left running by the previous supervisor,
// and Discard.
func TestPrestartedDiscarded(t *testing.T) {
	ctx := context.Background()
	env := map[string]string{"GORACE": "atexit_sleep_ms=0"}
	t.Run("another nexlet", func(t *testing.T) {
		p := prestartFake(t, fakeSpec("x", "block"), env)
		s := New(Options{Prestarted: p})
		if err := s.Start(ctx, fakeSpec("y", "block", "other")); err != nil {
			t.Fatal(err)
		}
		if status(s, "y").PID == p.Pid() {
			t.Fatal("another nexlet took the pre-started process")
		}
		if !alive(p.Pid()) {
			t.Fatal("the pre-started process died before Stop")
		}
		stopAll(t, s)
		if !gone(p.Pid()) {
			t.Fatal("Stop left the unused pre-started process")
		}
	})
	for _, refused := range []struct {
		name, why string
		change    func(*Spec)
	}{
		{"runtime variable", "read another GOGC at exec", func(s *Spec) { s.Env["GOGC"] = "50" }},
		{"CPU limit", "sized GOMAXPROCS outside its CPU limit", func(s *Spec) { s.Limits.CPUMax = 0.5 }},
	} {
		t.Run(refused.name, func(t *testing.T) {
			cg, _ := v1Nexlets(t, false)
			spec := fakeSpec("x", "block")
			p := prestartFake(t, spec, env)
			refused.change(&spec)
			s := New(Options{Cgroups: cg, Prestarted: p})
			defer stopAll(t, s)
			if err := s.Start(ctx, spec); err != nil {
				t.Fatal(err)
			}
			if pid := status(s, "x").PID; pid == p.Pid() || pid == 0 {
				t.Fatalf("runs pid %d: the pre-started %d %s", pid, p.Pid(), refused.why)
			}
			if !gone(p.Pid()) {
				t.Fatal("the refused pre-started process is left")
			}
		})
	}
	t.Run("adopted", func(t *testing.T) {
		dir := t.TempDir()
		ready := filepath.Join(dir, "notified")
		spec := fakeSpec("keep", "block-hup", ready)
		spec.Outlive = true
		opts := Options{RecordDir: filepath.Join(dir, "records"), FIFODir: filepath.Join(dir, "fifos"), Adopt: []string{"keep"}}
		s1 := New(opts)
		if err := s1.Start(ctx, spec); err != nil {
			t.Fatal(err)
		}
		left := status(s1, "keep").PID
		// The adoption signals SignalReattach: the fake must catch it by then, or the
		// default action ends it. Not SigCgt: a Go program's runtime catches SIGHUP from
		// its start and exits on it until signal.Notify, so the fake says when it asked
		// (the test failed 'runs pid 0' in 1 of 40 runs under load waiting for SigCgt).
		testkit.Eventually(t, "the fake nexlet notified of SignalReattach", func() bool {
			_, err := os.Stat(ready)
			return err == nil
		})
		s1.Detach()
		stopAll(t, s1)
		p := prestartFake(t, spec, env)
		opts.Prestarted = p
		s2 := New(opts)
		defer stopAll(t, s2)
		if err := s2.Start(ctx, spec); err != nil {
			t.Fatal(err)
		}
		if got := status(s2, "keep").PID; got != left {
			t.Fatalf("runs pid %d, want the adopted %d", got, left)
		}
		if !gone(p.Pid()) {
			t.Fatal("the pre-started process is left beside the adopted nexlet")
		}
	})
	t.Run("Discard", func(t *testing.T) {
		p := prestartFake(t, fakeSpec("x", "block"), env)
		p.Discard()
		if !gone(p.Pid()) {
			t.Fatal("Discard left the process")
		}
		p.Discard()
	})
}

// TestPrestartedDeadPidReusedNotPlaced: a pre-started process that ended before its
// start took it (killed, crashed in its runtime start) is reaped by its exec.Cmd, and
// its pid is free for any process. The start must not then move the process now holding
// that pid into the nexlet's cgroup nor set its oom_score_adj (nor record it): it forks
// the nexlet anew and leaves the stranger alone. The stranger is made to get the pid by
// /proc/sys/kernel/ns_last_pid. Before the fix the stranger was moved into
// <name>/nexlet and given oom_score_adj 321; the nexlet then forked.
func TestPrestartedDeadPidReusedNotPlaced(t *testing.T) {
	cg, _ := v1Nexlets(t, true)
	dir := t.TempDir()
	spec := fakeSpec("x", "block")
	p := prestartFake(t, spec, map[string]string{"GORACE": "atexit_sleep_ms=0"})
	target := p.Pid()
	if err := syscall.Kill(target, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the killed pre-started process reaped", func() bool { return gone(target) })
	var stranger *exec.Cmd
	for i := 0; i < 50 && stranger == nil; i++ {
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(target-1)), 0); err != nil {
			t.Skipf("cannot choose the next pid: %v", err)
		}
		c := exec.Command("sleep", "60")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		if c.Process.Pid == target {
			stranger = c
			break
		}
		_ = c.Process.Kill()
		_ = c.Wait()
	}
	if stranger == nil {
		t.Skip("another process kept taking the pid")
	}
	defer func() { _ = stranger.Process.Kill(); _ = stranger.Wait() }()
	cgBefore, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", target))
	oomBefore, _ := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", target))
	s := New(Options{Cgroups: cg, RecordDir: filepath.Join(dir, "records"), FIFODir: filepath.Join(dir, "fifos"),
		Prestarted: p, NexletOOMScoreAdj: 321})
	defer stopAll(t, s)
	if err := s.Start(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	if pid := status(s, "x").PID; pid == target || pid == 0 {
		t.Fatalf("the nexlet runs as pid %d, the stranger's %d", pid, target)
	}
	if got, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", target)); string(got) != string(cgBefore) {
		t.Errorf("the stranger holding the dead pre-started pid was moved:\nbefore %s\nafter %s", cgBefore, got)
	}
	if got, _ := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", target)); string(got) != string(oomBefore) {
		t.Errorf("the stranger's oom_score_adj set: %q, was %q", got, oomBefore)
	}
}

// prestartedEarlyWarming is a fake nexlet exec'd as at nexd's init, whose cgroup
// warm-up began (earlynexlet's Warm) and is held until free, taken over as a
// Prestarted. Discarded when the test ends (after free).
func prestartedEarlyWarming(t *testing.T) (p *Prestarted, free func()) {
	t.Helper()
	spec := fakeSpec("x", "block")
	env := map[string]string{"GORACE": "atexit_sleep_ms=0"}
	e, err := earlynexlet.Fork(spec.Path, spec.Args, env, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	free = func() { releaseOnce.Do(func() { close(release) }) }
	e.Warm(func(int) error { close(entered); <-release; return nil })
	<-entered
	p, differs, err := PrestartedEarly(e, env)
	if err != nil || p == nil {
		free()
		e.Discard()
		t.Fatalf("PrestartedEarly: %v (differs %q)", err, differs)
	}
	t.Cleanup(p.Discard)
	t.Cleanup(free) // before Discard, which waits for the warm-up
	return p, free
}

// TestPrestartedEarlyWarmHoldsReap: a process exec'd at nexd's init whose cgroup
// warm-up began before it was watched (earlynexlet's Warm, begun at nexd's package init) is not
// reaped while that warm-up runs, even when it dies meanwhile: the warm-up does not
// look at the watcher's state, so only the wait keeps its pid from being another
// process's. Its hand-off waits for the warm-up as for its own.
func TestPrestartedEarlyWarmHoldsReap(t *testing.T) {
	p, free := prestartedEarlyWarming(t)
	if err := syscall.Kill(p.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the killed process's end seen", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.ended
	})
	if gone(p.Pid()) {
		t.Fatal("reaped while its warm-up ran: its pid may be another process's")
	}
	select {
	case <-p.done:
		t.Fatal("reaped while its warm-up ran")
	default:
	}
	free()
	<-p.done
	if !gone(p.Pid()) {
		t.Fatal("not reaped once its warm-up ended")
	}
}

// TestPrestartedAwaitWarm: AwaitWarm returns only once the warm-up begun before the
// process was watched (earlynexlet's, at nexd's package init) is done, and with an
// error naming that wait when its context ends first; a nil Prestarted has nothing to
// wait for. The nexlets' manager waits so before it empties the v2 cgroup root
// (cgroup's TestV2EnterSupervisorWaitsForSettle).
func TestPrestartedAwaitWarm(t *testing.T) {
	if err := (*Prestarted)(nil).AwaitWarm(context.Background()); err != nil {
		t.Fatalf("nil: %v", err)
	}
	p, free := prestartedEarlyWarming(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := p.AwaitWarm(ctx)
	if err == nil || !strings.Contains(err.Error(), "cgroup warm-up") || !strings.Contains(err.Error(), strconv.Itoa(p.Pid())) {
		t.Fatalf("AwaitWarm with an ended context while the warm-up is held: %v", err)
	}
	free()
	if err := p.AwaitWarm(context.Background()); err != nil {
		t.Fatalf("AwaitWarm after the warm-up: %v", err)
	}
}
