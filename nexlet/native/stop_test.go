package native

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestStopRepliesBeforeTidyAndRestartWaits: a stop's reply comes once every process of
// the workload is gone (the child it forked too), and before what it left behind (its
// cgroup, directory and record) is removed; WORKLOADSTOPPED comes once that is done. A
// start of the same id meanwhile waits for the removal, then runs with its own cgroup,
// directory and record, which the removal did not touch.
func TestStopRepliesBeforeTidyAndRestartWaits(t *testing.T) {
	spec := cgroupSpec(t)
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{Cgroup: spec})
	hold := make(chan struct{})
	tn.beforeTidy = func(string) { <-hold } // a slow removal
	released := false
	defer func() {
		if !released {
			close(hold)
		}
	}()
	pidFile := filepath.Join(sharedDir(t), "child.pid")
	fn.mustStart("tidy", startReq(protocol.LifecycleService, "tidy", map[string]any{
		"uri": script(t, `sleep 1000 & echo $! > "$1"; echo up; wait`), "argv": []string{pidFile}}, fn.creds()))
	fn.waitLog("tidy", "stdout", "up")
	main := fn.procsOf("tidy")
	b, _ := os.ReadFile(pidFile)
	child, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if len(main) == 0 || child == 0 {
		t.Fatalf("processes: %v, child %d", main, child)
	}
	dir, rec := filepath.Join(tn.WorkloadsDir(), "tidy"), tn.recordDir("tidy")

	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "tidy"), protocol.StopWorkloadRequest{Namespace: testNS}, waitLong)
	if err != nil {
		t.Fatal(err)
	}
	var resp protocol.StopWorkloadResponse
	if err := json.Unmarshal(r.data, &resp); err != nil || !resp.Stopped {
		t.Fatalf("stop: %v %q", err, r.data)
	}
	for _, p := range append(main, child) {
		if alive(p) {
			t.Errorf("process %d still alive at the stop's reply", p)
		}
	}
	for _, p := range []string{dir, rec} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed before the reply: %v", p, err)
		}
	}
	if len(fn.query(testNS, "tidy")) != 0 {
		t.Errorf("a stopped workload is still listed")
	}
	if fn.hasStoppedEvent("tidy") {
		t.Errorf("WORKLOADSTOPPED before its leftovers were removed")
	}

	// The same id again while the removal is held: the start waits for it.
	again := startReq(protocol.LifecycleService, "tidy", map[string]any{"uri": script(t, `echo again; exec sleep 1000`)}, fn.creds())
	started := make(chan reply, 1)
	go func() {
		r, err := fn.request(protocol.StartWorkloadSubject(testNode, testAgent, "tidy"), again, waitLong)
		if err != nil {
			r.code, r.errText = "timeout", err.Error()
		}
		started <- r
	}()
	select {
	case r := <-started:
		t.Fatalf("a start of the id being removed did not wait: %+v", r)
	case <-time.After(300 * time.Millisecond):
	}
	close(hold)
	released = true
	if r := <-started; r.code != "" {
		t.Fatalf("start after the removal: %s %s", r.code, r.errText)
	}
	fn.stoppedEvent("tidy")
	fn.waitLog("tidy", "stdout", "again")
	for _, p := range []string{dir, rec} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the new run's %s: %v", p, err)
		}
	}
	p := fn.procsOf("tidy") // "again" comes right before the exec: procsOf waits it out
	if len(p) != 1 {
		t.Fatalf("new run's processes: %v", p)
	}
	if g := memoryCgroup(t, p[0]); filepath.Base(g) != "tidy" {
		t.Errorf("new run's process in cgroup %s", g)
	} else if _, err := os.Stat(filepath.Join("/sys/fs/cgroup/memory", g)); err != nil {
		t.Errorf("new run's cgroup: %v", err)
	}
	fn.stop("tidy", testNS)
}

// memoryCgroup is pid's cgroup in the v1 memory hierarchy.
func memoryCgroup(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.SplitN(line, ":", 3); len(f) == 3 && f[1] == "memory" {
			return f[2]
		}
	}
	t.Fatalf("pid %d: no memory cgroup in %q", pid, b)
	return ""
}

// TestCrashDuringTidyLeavesNothing: a nexlet that dies after a stop's reply and before
// the workload's leftovers are removed (its cgroup, directory, record, the uid's lease)
// leaves them to the next nexlet, which removes them when the node does not replay the
// workload, and starts the same id again afresh.
func TestCrashDuringTidyLeavesNothing(t *testing.T) {
	spec := cgroupSpec(t)
	fn := newFakeNode(t)
	runtimeDir := t.TempDir()
	first := fn.startNexlet(Config{Cgroup: spec, RuntimeDir: runtimeDir})
	hold := make(chan struct{})
	first.beforeTidy = func(string) {
		<-hold
		runtime.Goexit() // the process died here: nothing of the tidy runs
	}
	defer close(hold)
	fn.mustStart("crashtidy", startReq(protocol.LifecycleService, "crashtidy", map[string]any{
		"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds()))
	fn.waitLog("crashtidy", "stdout", "up")
	pids := fn.procsOf("crashtidy")
	if len(pids) != 1 {
		t.Fatalf("processes: %v", pids)
	}
	group := memoryCgroup(t, pids[0])
	first.mu.Lock()
	id := first.workloads["crashtidy"].ident
	first.mu.Unlock()
	dir, rec := filepath.Join(first.WorkloadsDir(), "crashtidy"), first.recordDir("crashtidy")
	// Not fn.stop: no WORKLOADSTOPPED comes from a nexlet that died before its tidy.
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "crashtidy"), protocol.StopWorkloadRequest{Namespace: testNS}, waitLong)
	first.crash()
	var resp protocol.StopWorkloadResponse
	if err != nil || json.Unmarshal(r.data, &resp) != nil || !resp.Stopped {
		t.Fatalf("stop: %v %q", err, r.data)
	}

	second := fn.startNexlet(Config{Cgroup: spec, RuntimeDir: runtimeDir})
	leftovers := func() []string {
		var left []string
		for _, p := range []string{dir, rec, filepath.Join("/sys/fs/cgroup/memory", group)} {
			if _, err := os.Stat(p); err == nil {
				left = append(left, p)
			}
		}
		if id.dynamic {
			if _, err := os.Stat(second.users.leasePath(id.uid)); err == nil {
				left = append(left, "lease of uid "+strconv.Itoa(int(id.uid)))
			}
		}
		return left
	}
	testkit.Eventually(t, "the stopped workload's leftovers removed", func() bool { return len(leftovers()) == 0 })
	if l := leftovers(); len(l) != 0 {
		t.Fatalf("left behind: %v", l)
	}
	fn.mustStart("crashtidy", startReq(protocol.LifecycleService, "crashtidy", map[string]any{
		"uri": script(t, `echo again; exec sleep 1000`)}, fn.creds()))
	fn.waitLog("crashtidy", "stdout", "again")
	fn.stop("crashtidy", testNS)
}

// TestLameduckStopRepliesAfterTidy: in lame duck the leftovers go before the reply: nexd
// stops once its drain is answered and would not wait for a removal after it.
func TestLameduckStopRepliesAfterTidy(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	hold := make(chan struct{})
	defer close(hold)
	tn.beforeTidy = func(string) { <-hold } // a removal after the reply would wait here
	fn.mustStart("ld", startReq(protocol.LifecycleService, "ld", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds()))
	fn.waitLog("ld", "stdout", "up")
	dir, rec := filepath.Join(tn.WorkloadsDir(), "ld"), tn.recordDir("ld")
	if err := tn.SetLameduck(time.Hour); err != nil {
		t.Fatal(err)
	}
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "ld"), protocol.StopWorkloadRequest{Namespace: testNS}, waitLong)
	if err != nil {
		t.Fatal(err)
	}
	var resp protocol.StopWorkloadResponse
	if err := json.Unmarshal(r.data, &resp); err != nil || !resp.Stopped {
		t.Fatalf("stop: %v %q", err, r.data)
	}
	for _, p := range []string{dir, rec} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still there at the reply in lame duck: %v", p, err)
		}
	}
}

// TestAskedStopRememberedAcrossNexletKill: the nexlet is killed after stops: one the
// node asked for, one at the node's shutdown (nexd_keep: the node keeps the workload
// to start it again). The next nexlet on the runtime directory must list the first
// among the workloads it stopped at a request (nexd_stopped: the node removes it from
// its state instead of starting it again, should the node have died before it did) and
// not the second, whose start again is wanted. Before, a killed nexlet's stops were
// forgotten: 0 of 1 listed.
func TestAskedStopRememberedAcrossNexletKill(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	for _, id := range []string{"asked", "kept"} {
		fn.mustStart(id, startReq(protocol.LifecycleService, id, map[string]any{"uri": script(t, `echo up; while :; do sleep 0.05; done`)}, fn.creds()))
		fn.waitLog(id, "stdout", "up")
	}
	if resp := fn.stop("asked", testNS); !resp.Stopped {
		t.Fatalf("stop: %+v", resp)
	}
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "kept"), protocol.StopWorkloadRequest{Namespace: testNS, Keep: true}, waitLong)
	if err != nil || r.code != "" {
		t.Fatalf("stop at shutdown: %v %s %s", err, r.code, r.errText)
	}
	first.waitTidied()
	first.crash()

	second := fn.startNexlet(Config{RuntimeDir: runtime})
	got := second.RecentlyStopped()
	t.Logf("stops the next nexlet remembers: %v", got)
	if !slices.Contains(got, "asked") {
		t.Error("the stop the node asked for is forgotten by the next nexlet")
	}
	if slices.Contains(got, "kept") {
		t.Error("a stop at the node's shutdown is listed as asked for: the node would drop the workload it keeps")
	}
	if held := second.HeldWorkloads(); len(held) != 0 {
		t.Errorf("the next nexlet holds %v", held)
	}
}

// TestLameduckStopRememberedAcrossNexletKill: the nexlet's own lame duck timer stops a
// workload (the node's drain stop then finds it stopping and waits), and the nexlet is
// killed: the next one must list it as stopped at a request, as the node removes the
// drained workloads from its state. Before, only the node's stops were recorded.
func TestLameduckStopRememberedAcrossNexletKill(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	fn.mustStart("drained", startReq(protocol.LifecycleService, "drained", map[string]any{"uri": script(t, `echo up; while :; do sleep 0.05; done`)}, fn.creds()))
	fn.waitLog("drained", "stdout", "up")
	if err := first.SetLameduck(0); err != nil {
		t.Fatal(err)
	}
	fn.stoppedEvent("drained")
	first.crash()
	second := fn.startNexlet(Config{RuntimeDir: runtime})
	if got := second.RecentlyStopped(); !slices.Contains(got, "drained") {
		t.Errorf("the workload the lame duck drain stopped is forgotten by the next nexlet: %v", got)
	}
}

// BenchmarkMarkStopping is what a requested stop adds before its SIGTERM: the write of
// its stop record (on tmpfs where there is one, as the runtime directory is under
// systemd).
func BenchmarkMarkStopping(b *testing.B) {
	dir := b.TempDir()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if dir, err = os.MkdirTemp("/dev/shm", "markstop"); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
	}
	n := &Nexlet{cfg: Config{RuntimeDir: dir}, log: slog.New(slog.DiscardHandler)}
	w := &workload{id: "bench", ns: testNS}
	for b.Loop() {
		n.markStopping(w, 10*time.Second)
	}
}

// TestResumedStopAfterClockStepBack: a nexlet killed in a stop's grace leaves the stop
// to the next one, which kills what is left once the grace, counted from the stop's
// recorded wall-clock time, is over. The clock was stepped back an hour since (an NTP
// step, a VM resumed): the grace left is bounded by the grace itself, as a restart's
// backoff is (backoffLeft). Before, the workload that ignores SIGTERM ran on for the
// hour of the step.
func TestResumedStopAfterClockStepBack(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	fn.mustStart("stepped", startReq(protocol.LifecycleService, "stepped", map[string]any{"uri": script(t, `trap '' TERM; echo up; while :; do sleep 0.05; done`)}, fn.creds()))
	fn.waitLog("stepped", "stdout", "up")
	s, _ := fn.summary("stepped")
	pid, _ := strconv.Atoi(s.Metadata["pid"])
	if pid == 0 || !alive(pid) {
		t.Fatalf("no live pid in %+v", s)
	}
	first.crash()
	// The stop as the killed nexlet recorded it before its SIGTERM, an hour ahead of the
	// clock now, with a grace of 1 s.
	at := time.Now().Add(time.Hour)
	if err := os.MkdirAll(first.stopsDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	mark := fmt.Sprintf("%d %d %s %s", at.UnixMilli(), time.Second.Milliseconds(), testNS, RegisterType)
	if err := os.WriteFile(filepath.Join(first.stopsDir(), "stepped"), []byte(mark), 0o600); err != nil {
		t.Fatal(err)
	}
	fn.startNexlet(Config{RuntimeDir: runtime})
	testkit.EventuallyWithin(t, 30*time.Second, "the resumed stop kills the SIGTERM ignorer within its grace", func() bool {
		return !alive(pid)
	})
}

// TestStopGraceHoldEndsAtShutdown: the test-only stop-grace-held hold (the kill at the
// end of a stop's grace held until the test's release) ends when the nexlet's shutdown
// begins, so a nexlet shutting down does not sit in it. Before, the hold waited on
// context.Background() for its 30 s bound, and the shutdown's stop of the held workload
// with it: the shutdown below ran into its 20 s bound.
func TestStopGraceHoldEndsAtShutdown(t *testing.T) {
	fn := newFakeNode(t)
	var logs testkit.Buffer
	tn := fn.startNexlet(Config{TestHold: testhold.StopGraceHeld + "," + testhold.ReleaseIn(t.TempDir()),
		Logger: slog.New(slog.NewTextHandler(io.MultiWriter(&logs, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelWarn}))})
	req := startReq(protocol.LifecycleService, "deaf", map[string]any{"uri": script(t, `trap '' TERM; echo up; while :; do sleep 0.05; done`),
		"stop_grace": "100ms"}, fn.creds())
	fn.mustStart("deaf", req)
	fn.waitLog("deaf", "stdout", "up")
	stopped := make(chan error, 1)
	go func() {
		r, err := fn.request(protocol.StopWorkloadSubject(testNode, "deaf"), protocol.StopWorkloadRequest{Namespace: testNS}, waitLong)
		if err == nil && r.code != "" {
			err = fmt.Errorf("%s %s", r.code, r.errText)
		}
		stopped <- err
	}()
	testkit.EventuallyWithin(t, waitLong, "the stop's kill held at the end of its grace", func() bool {
		return logs.Contains("its kill held until released")
	})
	// Well below the hold's bound, and far above a shutdown's own work here.
	bound := testhold.StopGraceHeldMax * 2 / 3
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	began := time.Now()
	if err := tn.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown with a stop held at its grace's end: %v after %s", err, time.Since(began).Round(time.Millisecond))
	}
	took := time.Since(began)
	if err := <-stopped; err != nil {
		t.Fatalf("the held stop: %v", err)
	}
	if !logs.Contains("released=false") {
		t.Errorf("the hold did not say it ended unreleased:\n%s", logs.String())
	}
	if procs := fn.procsOf("deaf"); len(procs) > 0 {
		t.Errorf("the workload runs on after the shutdown: %v", procs)
	}
	t.Logf("shutdown with the stop held: %s", took.Round(time.Millisecond))
}
