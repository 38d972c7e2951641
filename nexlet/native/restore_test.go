package native

import (
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestSealedEnvSurvivesRestart: with the xkey kept in the state dir (LoadXKey) a
// restarted nexlet opens a replayed sealed environment and adopts the workload; a nexlet
// with another key lists the replayed workload as failed with the reason, never
// silently.
func TestSealedEnvSurvivesRestart(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	keyPath := filepath.Join(t.TempDir(), "nexlets", "native", XKeySeedFile)
	kp, err := LoadXKey(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	first := fn.startNexlet(Config{RuntimeDir: runtime, XKey: kp})

	client, _ := nkeys.CreateCurveKeys()
	clientPub, _ := client.PublicKey()
	clear, _ := json.Marshal(map[string]string{"SEALED_V": "kept"})
	sealed, err := client.Seal(clear, first.XKey())
	if err != nil {
		t.Fatal(err)
	}
	req := startReq(protocol.LifecycleService, "sealrestart", map[string]any{
		"uri":                   script(t, `echo "sealed=$SEALED_V"; exec sleep 1000`),
		"encrypted_environment": protocol.EncEnv{Base64EncryptedEnv: base64.StdEncoding.EncodeToString(sealed), EncryptedBy: clientPub},
	}, fn.creds())
	fn.mustStart("sealrestart", req)
	fn.waitLog("sealrestart", "stdout", "sealed=kept")
	pid := fn.procsOf("sealrestart")
	first.crash()
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"sealrestart": req}
	fn.mu.Unlock()

	// Same key, loaded again from the state dir: adopted, same process.
	again, err := LoadXKey(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	second := fn.startNexlet(Config{RuntimeDir: runtime, XKey: again})
	if second.XKey() != first.XKey() {
		t.Fatalf("xkey changed across restarts: %s -> %s", first.XKey(), second.XKey())
	}
	testkit.Eventually(t, "sealed workload adopted", func() bool {
		s, ok := fn.summary("sealrestart")
		return ok && s.WorkloadState == protocol.WorkloadRunning && slices.Equal(fn.procsOf("sealrestart"), pid)
	})
	second.crash()

	// Another key: the replay cannot open the environment and says so.
	other, _ := nkeys.CreateCurveKeys()
	fn.startNexlet(Config{RuntimeDir: runtime, XKey: other})
	testkit.Eventually(t, "failed replay listed", func() bool {
		s, ok := fn.summary("sealrestart")
		return ok && s.WorkloadState == protocol.WorkloadError && strings.Contains(s.Metadata["reason"], "encrypted_environment")
	})
	s, _ := fn.summary("sealrestart")
	if !strings.Contains(s.Metadata["reason"], "replay failed") || !strings.Contains(s.Metadata["reason"], "still run") {
		t.Errorf("reason %q should say the replay failed and the process still runs", s.Metadata["reason"])
	}
	fn.stop("sealrestart", testNS)
	for _, p := range fn.procsOf("sealrestart") {
		_ = syscall.Kill(-p, syscall.SIGKILL)
	}
}

// TestExitAfterDetachIsReported: a job that ends while its nexlet detaches (nexd
// hands the nexlet's workloads to a new one: live_restore, an upgrade) is reaped by the
// detaching nexlet, which alone then knows its exit status. It is recorded for the next
// nexlet, which reports it with its exit code. Before, it reported the job "lost" (-1):
// the status went with the old nexlet.
func TestExitAfterDetachIsReported(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	marker := filepath.Join(sharedDir(t), "go")
	req := startReq(protocol.LifecycleJob, "late", map[string]any{
		"uri": script(t, `echo up; while [ ! -e `+marker+` ]; do sleep 0.01; done; exit 7`)}, fn.creds())
	fn.mustStart("late", req)
	fn.waitLog("late", "stdout", "up")
	s, _ := fn.summary("late")
	pid := s.Metadata["pid"]
	if pid == "" {
		t.Fatalf("no pid in the job's summary %+v", s)
	}
	// As the nexlet's Main does on SignalDetach: let go, then stop the runner.
	first.Detach()
	_ = first.r.Shutdown()
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the job reaped by the detaching nexlet", func() bool {
		_, err := os.Stat("/proc/" + pid)
		return os.IsNotExist(err)
	})
	first.watch.stop() // as the exiting nexlet's Close does: its reaps are done

	fn.replayTo(runtime, "late", req)
	if ev := fn.endedOnce("late"); ev.Metadata["exit_code"] != "7" {
		t.Fatalf("the job that ended during the detach was reported with exit code %s (%s), want 7", ev.Metadata["exit_code"], ev.Metadata["reason"])
	}
	if len(fn.procsOf("late")) != 0 {
		t.Error("the job ran again")
	}
}

// TestRestartDueAtDetach: a job with a restart policy whose run failed waits out its
// backoff when its nexlet detaches (nexd hands the workloads to a new nexlet:
// live_restore, an upgrade). The next nexlet honours the policy as the first would
// have: it runs the job again, counting the restart the first one used, so a budget of
// one restart means two runs in all, and the end says the budget is used up. Before,
// the next nexlet reported the failed run's exit code and never ran the job again.
func TestRestartDueAtDetach(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	req, runs := fn.startFailingJob("retry", "3s")
	testkit.Eventually(t, "the job's first run failed and its restart waits out the backoff", func() bool {
		s, ok := fn.summary("retry")
		return ok && s.WorkloadState == protocol.WorkloadStarting && s.Metadata["restarts"] == "1"
	})
	first.detach()
	fn.replayRanOutItsRestart(Config{RuntimeDir: runtime}, "retry", req, runs)
}

// TestKillInReplayedRestartBeforeLaunch: a job's run failed and its nexlet was killed
// during the backoff, leaving its one restart due. The next nexlet, replaying it, is
// killed in turn while it prepares that restart (its directory and user made, before
// the launch: for a nats:// artifact, the download). The nexlet after it must still
// make the restart, as restart 1 of 1: two runs in all, one end with the limit reached,
// and its registration must say it holds the job (nexd removes a stored job its nexlet
// does not hold, never starting it again). Before, the replay removed the job's records
// before the launch wrote new ones: the third nexlet found nothing, the job ran as a
// fresh start with its budget from zero (three runs), and a real node would have
// dropped it as not held, its restart never made.
func TestKillInReplayedRestartBeforeLaunch(t *testing.T) {
	fn := newFakeNode(t)
	cfg := Config{RuntimeDir: t.TempDir()}
	first := fn.startNexlet(cfg)
	const id = "prep"
	req, runs := fn.startFailingJob(id, "3s")
	testkit.Eventually(t, "the job's first run failed and its restart waits out the backoff", func() bool {
		s, ok := fn.summary(id)
		return ok && s.WorkloadState == protocol.WorkloadStarting && s.Metadata["restarts"] == "1"
	})
	first.crash()
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{id: req}
	fn.mu.Unlock()
	preparing := make(chan struct{})
	second := fn.startNexletHooked(cfg, func(n *Nexlet) {
		n.beforeLaunch = func(string) {
			close(preparing)
			runtime.Goexit() // the nexlet died here
		}
	})
	select {
	case <-preparing:
	case <-time.After(waitLong):
		t.Fatal("the replayed restart was never prepared")
	}
	second.crash()
	fn.replayRanOutItsRestart(cfg, id, req, runs)
	fn.mu.Lock()
	reg := fn.lastReg
	fn.mu.Unlock()
	if reg.Workloads == nil || !slices.Contains(*reg.Workloads, id) {
		t.Errorf("the third nexlet registered holding %v, not the job %s: nexd would drop it unrestarted", reg.Workloads, id)
	}
}

// TestTombstoneReplayRemovesExitRecord: a job ended and its tombstone was written, and
// its nexlet was killed before it removed the exit record it wrote ahead of the reap
// (here: that record written again after the crash). The next nexlet reports the job
// from its tombstone and removes the exit record too. Before, it was left in nexd's
// exits directory, one per such kill, until a nexd start a day later pruned it.
func TestTombstoneReplayRemovesExitRecord(t *testing.T) {
	fn := newFakeNode(t)
	cfg := Config{RuntimeDir: t.TempDir(), ExitsDir: t.TempDir()}
	first := fn.startNexlet(cfg)
	const id = "tomb"
	req := startReq(protocol.LifecycleJob, id, map[string]any{"uri": script(t, "exit 3")}, fn.creds())
	fn.mustStart(id, req)
	fn.stoppedEvent(id)
	first.crash()
	rec, ok := first.readPID(id)
	if !ok {
		t.Fatal("no pid record")
	}
	if err := procid.WriteExit(cfg.ExitsDir, rec, procid.Exit{Code: 3, Reason: "exited with code 3"}); err != nil {
		t.Fatal(err)
	}
	fn.replayWith(cfg, id, req)
	testkit.Eventually(t, "the replayed job reported from its tombstone", func() bool {
		return fn.countEvents(protocol.EventWorkloadStopped, id) == 2
	})
	testkit.Eventually(t, "no exit record left", func() bool {
		ents, _ := os.ReadDir(cfg.ExitsDir)
		return len(ents) == 0
	})
}

// startFailingJob starts job id, which appends a line to runs (returned) and exits 3,
// restarted on failure once after backoff.
func (fn *fakeNode) startFailingJob(id, backoff string) (protocol.AgentStartWorkloadRequest, string) {
	t := fn.t
	t.Helper()
	runs := filepath.Join(sharedDir(t), "runs")
	// Each run may have another dynamic uid: every one may append.
	if err := os.WriteFile(runs, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(runs, 0o666); err != nil {
		t.Fatal(err)
	}
	req := startReq(protocol.LifecycleJob, id, map[string]any{
		"uri":     script(t, `echo run >> `+runs+`; exit 3`),
		"restart": map[string]any{"policy": "on-failure", "max": 1, "backoff": backoff}}, fn.creds())
	fn.mustStart(id, req)
	return req, runs
}

// replayRanOutItsRestart replays job id (startFailingJob) to a new nexlet of cfg and
// checks that it ran twice in all and ended once, with its restart limit reached.
func (fn *fakeNode) replayRanOutItsRestart(cfg Config, id string, req protocol.AgentStartWorkloadRequest, runs string) {
	t := fn.t
	t.Helper()
	fn.replayWith(cfg, id, req)
	ev := fn.endedOnce(id)
	if ev.Metadata["exit_code"] != "3" || !strings.Contains(ev.Metadata["reason"], "restart limit of 1 reached") {
		t.Errorf("the job ended with %q (%s), want 3 with its restart limit of 1 reached", ev.Metadata["exit_code"], ev.Metadata["reason"])
	}
	b, err := os.ReadFile(runs)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "run\n"); n != 2 {
		t.Errorf("the job ran %d times, want 2 (its run and its one restart)", n)
	}
}

// TestRestartLaunchedAtDetach: a job's restart backoff ends just as its nexlet detaches
// (nexd hands the workloads to a new nexlet), and the restart's launch is under way.
// Detach must wait for that launch, as it waits for the ends under way: the nexlet
// exits once Detach returns, and a launch it has not made by then is lost (the next
// nexlet finds no process, no record of a due restart and no exit record of nexd's, and
// reports the job lost, never running its restart). Here the detach comes while the
// launch is held; once let go, the job runs its restart, twice in all, and ends with
// its restart limit reached.
func TestRestartLaunchedAtDetach(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	relaunching, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	first.beforeRelaunch = func(string) {
		once.Do(func() { close(relaunching) })
		<-release
	}
	req, runs := fn.startFailingJob("relaunch", "10ms")
	select {
	case <-relaunching:
	case <-time.After(waitLong):
		t.Fatal("the job's restart was never launched")
	}
	detached := make(chan struct{})
	go func() { first.Detach(); close(detached) }()
	testkit.Eventually(t, "the nexlet detaches", first.detached)
	select {
	case <-detached:
		t.Error("Detach returned while the job's restart was being launched: the nexlet exits then, and the restart is lost")
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	select {
	case <-detached:
	case <-time.After(waitLong):
		t.Fatal("Detach did not return once the launch was let go")
	}
	_ = first.r.Shutdown()
	// The restart, launched by the detached nexlet, fails as the first run did: the
	// detached nexlet reaps it and records its end before it exits.
	testkit.Eventually(t, "the restart's end recorded by the detached nexlet", func() bool {
		_, ok := first.readTombstone("relaunch")
		return ok
	})
	first.watch.stop() // as the exiting nexlet's Close does: its reaps are done

	fn.replayRanOutItsRestart(Config{RuntimeDir: runtime}, "relaunch", req, runs)
}

// TestEndBeforeDetachRecorded: a job's process ends and is reaped just before its
// nexlet detaches, and its supervisor has not run since (a hook holds it). Detach
// records the end for the next nexlet, which reports the job's exit code. Before,
// nothing recorded it (Detach waited only for ends a supervisor had counted), and the
// next nexlet reported the job lost (-1).
func TestEndBeforeDetachRecorded(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	seen, hold := make(chan struct{}, 1), make(chan struct{})
	first.beforeEnd = func(string) {
		seen <- struct{}{}
		<-hold
	}
	released := false
	t.Cleanup(func() { // before the nexlet's own clean-up
		if !released {
			close(hold)
		}
	})
	req := startReq(protocol.LifecycleJob, "early", map[string]any{"uri": script(t, `exit 5`)}, fn.creds())
	fn.mustStart("early", req)
	select {
	case <-seen:
	case <-time.After(waitLong):
		t.Fatal("the job's end did not reach its supervisor")
	}
	first.detach()
	fn.replayTo(runtime, "early", req)
	ev := fn.stoppedEvent("early")
	if got := ev.Metadata["exit_code"]; got != "5" {
		t.Errorf("the job that ended before the detach was reported with exit code %s (%s), want 5", got, ev.Metadata["reason"])
	}
	close(hold) // the old supervisor runs now: it records nothing more
	released = true
	fn.endedOnce("early")
}

// TestEndAtDeployDetachRecorded: a deploy's process ends, and is reaped, before its
// deploy is done, and the nexlet detaches right then (a hook), before the workload's
// supervisor starts. The detach records the end, and the next nexlet reports the job
// with its exit code, once. Before, the process became the workload's current one
// (w.cur) only after the deploy's launch returned, so the detach did not see it, nor did
// its reaper, which ran before the detach: the next nexlet reported the job lost.
func TestEndAtDeployDetachRecorded(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	first.afterBegin = func(_ string, p *proc) {
		<-p.exited
		first.Detach()
	}
	req := startReq(protocol.LifecycleJob, "quick", map[string]any{"uri": script(t, `exit 5`)}, fn.creds())
	fn.mustStart("quick", req)
	_ = first.r.Shutdown() // detached once, in the hook (a second Detach would record the end)
	first.watch.stop()
	fn.replayTo(runtime, "quick", req)
	ev := fn.endedOnce("quick")
	if got := ev.Metadata["exit_code"]; got != "5" {
		t.Errorf("the job that ended as its deploy detached was reported with exit code %s (%s), want 5", got, ev.Metadata["reason"])
	}
}

// TestStopAtDetachReportedOnce: a stop is under way (the workload takes its time to
// exit on SIGTERM) when its nexlet detaches, and the process ends after the detach,
// reaped by the detached nexlet, whose record of the end is slow (a hook). The stop
// claims the end or leaves it to the detach: either way the end is recorded once, the
// stop is answered that the next nexlet reports it, and the next nexlet does, once.
// Before, the stop was answered as done and its tidy removed the record, and the
// detached nexlet's record of the end, written after, made it again: a workload the
// node no longer had was held by the next nexlet.
func TestStopAtDetachReportedOnce(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	hold := make(chan struct{})
	first.beforeDetachedRecord = func(string) { <-hold }
	released := false
	t.Cleanup(func() {
		if !released {
			close(hold)
		}
	})
	marker := filepath.Join(sharedDir(t), "go")
	req := startReq(protocol.LifecycleService, "slowstop", map[string]any{
		"uri": script(t, `trap 'while [ ! -e `+marker+` ]; do sleep 0.01; done; exit 9' TERM; echo up; while :; do sleep 0.05; done`)}, fn.creds())
	fn.mustStart("slowstop", req)
	fn.waitLog("slowstop", "stdout", "up")
	type answer struct {
		r   reply
		err error
	}
	answered := make(chan answer, 1)
	go func() {
		r, err := fn.request(protocol.StopWorkloadSubject(testNode, "slowstop"), protocol.StopWorkloadRequest{Namespace: testNS}, waitLong)
		answered <- answer{r, err}
	}()
	testkit.Eventually(t, "the stop under way", func() bool {
		s, ok := fn.summary("slowstop")
		return ok && s.WorkloadState == protocol.WorkloadStopping
	})
	first.Detach()
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	a := <-answered
	if a.err != nil {
		t.Fatal(a.err)
	}
	first.waitTidied() // what the stop left for after its answer is done
	close(hold)        // and then the detached nexlet's record of the end is written
	released = true
	first.watch.stop() // its reaps are done
	_ = first.r.Shutdown()
	_, err := os.Stat(first.recordDir("slowstop"))
	var resp protocol.StopWorkloadResponse
	_ = json.Unmarshal(a.r.data, &resp)
	if resp.Stopped || a.r.code == "" {
		t.Fatalf("the stop was answered as done (%q; its record made again after the stop removed it: %v), want an answer that the next nexlet reports the end", a.r.data, err == nil)
	}
	if _, ok := first.readTombstone("slowstop"); !ok {
		t.Fatal("the end of the workload stopped at the detach is not recorded for the next nexlet")
	}

	// The node kept the workload (its stop failed) and replays it.
	fn.replayTo(runtime, "slowstop", req)
	if ev := fn.endedOnce("slowstop"); ev.Metadata["exit_code"] != "9" {
		t.Errorf("the workload stopped at the detach was reported with exit code %s (%s), want 9", ev.Metadata["exit_code"], ev.Metadata["reason"])
	}
	if len(fn.procsOf("slowstop")) != 0 {
		t.Error("the workload stopped at the detach runs again")
	}
}

// detach lets tn go as the nexlet's Main does on SignalDetach (let go of the workloads,
// stop the runner) and waits for the reaps it still does.
func (tn *testNexlet) detach() {
	tn.Detach()
	_ = tn.r.Shutdown()
	tn.watch.stop()
}

// replayTo starts the next nexlet on runtime, to which the node replays req as id.
func (fn *fakeNode) replayTo(runtime, id string, req protocol.AgentStartWorkloadRequest) {
	fn.replayWith(Config{RuntimeDir: runtime}, id, req)
}

// replayWith starts the next nexlet with cfg, to which the node replays req as id.
func (fn *fakeNode) replayWith(cfg Config, id string, req protocol.AgentStartWorkloadRequest) {
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{id: req}
	fn.mu.Unlock()
	fn.startNexlet(cfg)
}

// endedOnce waits for the WORKLOADSTOPPED of id and fails unless it is the only one.
func (fn *fakeNode) endedOnce(id string) *protocol.WorkloadStoppedEvent {
	fn.t.Helper()
	ev := fn.stoppedEvent(id)
	if n := fn.countEvents(protocol.EventWorkloadStopped, id); n != 1 {
		fn.t.Errorf("%d WORKLOADSTOPPED events for %s, want 1", n, id)
	}
	return ev
}

// TestDueRestartFollowsThePidRecord: a due restart record is due only while the pid
// record names the run whose end it follows, so a nexlet killed after the relaunch
// wrote its pid record (and before anything else) leaves a run, not a restart due as
// well: the next nexlet never starts that restart a second time. A record without the
// run (an older nexlet's, written at a detach) is due, at once. The end and backoff
// read back (what is left of the backoff, measured from the end). The restarts of the
// newest launch are read back as written (none: 0).
func TestDueRestartFollowsThePidRecord(t *testing.T) {
	// Records only: no nexlet runs on them (one would sweep a record it does not hold).
	n := &Nexlet{cfg: Config{RuntimeDir: t.TempDir()}, log: slog.New(slog.NewTextHandler(testWriter{t}, nil))}
	const id = "due"
	if _, ok := n.readRestartDue(id); ok {
		t.Fatal("a restart due without any record")
	}
	if r := n.readRestarts(id); r != 0 {
		t.Fatalf("restarts without a record: %d", r)
	}
	ended, relaunched := procid.ID{PID: 4242, Start: 100}, procid.ID{PID: 4343, Start: 200}
	if err := n.writePID(id, ended); err != nil {
		t.Fatal(err)
	}
	end := time.Now().Add(-10 * time.Second).Truncate(time.Millisecond)
	n.writeRestartDue(id, restartDue{restarts: 2, last: procid.Exit{Code: 3, Reason: "exited with code 3"}, end: end, backoff: 30 * time.Second})
	d, ok := n.readRestartDue(id)
	if !ok || d.restarts != 2 || d.last.Code != 3 || d.last.Reason != "exited with code 3" || !d.end.Equal(end) || d.backoff != 30*time.Second {
		t.Fatalf("due restart = %+v %v, want 2, code 3, its reason, its end and 30s", d, ok)
	}
	if left := d.left(); left <= 15*time.Second || left > 20*time.Second {
		t.Errorf("backoff left %s, want 20s less the moments since", left)
	}
	n.writeRestarts(id, 2)
	if err := n.writePID(id, relaunched); err != nil {
		t.Fatal(err)
	}
	if d, ok := n.readRestartDue(id); ok {
		t.Errorf("restart %d still due once the relaunch's pid was recorded", d.restarts)
	}
	if r := n.readRestarts(id); r != 2 {
		t.Errorf("restarts of the relaunch = %d, want 2", r)
	}
	if err := os.WriteFile(filepath.Join(n.recordDir(id), "restart"), []byte("1 3 exited with code 3"), 0o600); err != nil {
		t.Fatal(err)
	}
	if d, ok := n.readRestartDue(id); !ok || d.restarts != 1 || d.last.Reason != "exited with code 3" || d.left() != 0 {
		t.Errorf("an older nexlet's record = %+v %v, want restart 1 due at once", d, ok)
	}
}

// TestBackoffLeftAfterClockStep: a due restart's recorded end read back after the wall
// clock stepped back an hour (the end is then an hour ahead of now) leaves at most the
// backoff to wait, and one after the clock stepped forward nothing. Before, the step was
// added to the wait: a nexlet killed during a 30 s backoff had the next one restart
// the service after 1 h 0 m 30 s.
func TestBackoffLeftAfterClockStep(t *testing.T) {
	const backoff = 30 * time.Second
	for _, c := range []struct {
		step     time.Duration // the clock's step since the end was recorded
		min, max time.Duration
	}{{-time.Hour, backoff - time.Second, backoff}, {time.Hour, 0, 0}, {0, backoff - 5*time.Second, backoff}} {
		d := restartDue{restarts: 1, end: time.Now().Add(-c.step), backoff: backoff}
		if left := d.left(); left < c.min || left > c.max {
			t.Errorf("clock stepped %v: backoff left %v, want %v to %v", c.step, left, c.min, c.max)
		}
	}
}

// TestKillBetweenReapAndRecord: a job's failed run was reaped by its nexlet, which is
// killed before anything records the end (here: a hook on the watcher's goroutine right
// after the reap that never returns, the nexlet crashed meanwhile). The exit was recorded ahead of the reap, as
// nexd records a process whose nexlet died, so the next nexlet honours the job's policy:
// its one restart runs, two runs in all, one end with the limit reached. Before, only
// the dead nexlet had known the exit status: the next one reported the job lost (-1)
// after one run.
func TestKillBetweenReapAndRecord(t *testing.T) {
	fn := newFakeNode(t)
	cfg := Config{RuntimeDir: t.TempDir(), ExitsDir: t.TempDir()}
	first := fn.startNexlet(cfg)
	seen, hold := make(chan struct{}), make(chan struct{})
	first.afterReap = func(string) {
		close(seen)
		<-hold
		runtime.Goexit() // the nexlet died here: no reap, no record of the end
	}
	t.Cleanup(func() { close(hold) }) // before the nexlet's own clean-up
	req, runs := fn.startFailingJob("ahead", "10ms")
	select {
	case <-seen:
	case <-time.After(waitLong):
		t.Fatal("the job's process was not reaped")
	}
	first.crash()
	fn.replayRanOutItsRestart(cfg, "ahead", req, runs)
	testkit.Eventually(t, "no exit record left (each removed once its end was recorded)", func() bool {
		ents, _ := os.ReadDir(cfg.ExitsDir)
		return len(ents) == 0
	})
}

// TestLeftoversDoNotHoldOffADueRestart: a job's run fails (exit 3) and leaves a
// process behind in its sandbox; its nexlet is killed once the due restart is recorded
// and before it killed that leftover. The next nexlet kills the leftover and makes the
// restart: two runs in all, one end with the limit reached. Before, it adopted the
// leftover as the workload and the restart waited for it to end (here ten minutes).
func TestLeftoversDoNotHoldOffADueRestart(t *testing.T) {
	spec := cgroupSpec(t) // a sandbox that knows its processes after a crash
	fn := newFakeNode(t)
	cfg := Config{RuntimeDir: t.TempDir(), Cgroup: spec}
	recorded := make(chan struct{})
	var once sync.Once
	first := fn.startNexletHooked(cfg, func(n *Nexlet) {
		n.afterRestartDue = func(string) {
			once.Do(func() { close(recorded) })
			runtime.Goexit() // the nexlet died here
		}
	})
	const id = "leftover"
	dir := sharedDir(t)
	runs, left := filepath.Join(dir, "runs"), filepath.Join(dir, "left")
	for _, f := range []string{runs, left} {
		if err := os.WriteFile(f, nil, 0o666); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f, 0o666); err != nil {
			t.Fatal(err)
		}
	}
	// The first run leaves a sleep behind (its pid in left); the restart fails at once.
	req := startReq(protocol.LifecycleJob, id, map[string]any{
		"uri":     script(t, `echo run >> `+runs+`; if [ "$(wc -l < `+runs+`)" -eq 1 ]; then sleep 600 & echo $! > `+left+`; fi; exit 3`),
		"restart": map[string]any{"policy": "on-failure", "max": 1, "backoff": "3s"}}, fn.creds())
	fn.mustStart(id, req)
	select {
	case <-recorded:
	case <-time.After(waitLong):
		t.Fatal("the job's restart was never recorded as due")
	}
	b, _ := os.ReadFile(left)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || !alive(pid) {
		t.Fatalf("no leftover process (%q)", b)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	first.crash()
	if !alive(pid) {
		t.Fatal("the leftover died with its nexlet")
	}
	fn.replayRanOutItsRestart(cfg, id, req, runs)
	testkit.Eventually(t, "the leftover killed", func() bool { return !alive(pid) })
}

// TestStopOfEndedRunSignalsNothing: a stop that reaches a workload whose run stands for
// an ended one (pid 0: a replayed end, or a replayed restart waiting out its backoff)
// signals no process. Before, terminate sent SIGTERM to pid 0, which is the nexlet's
// own process group (here the test binary's: the SIGTERM arrives).
func TestStopOfEndedRunSignalsNothing(t *testing.T) {
	got := make(chan os.Signal, 1)
	signal.Notify(got, syscall.SIGTERM)
	defer signal.Stop(got)
	n := &Nexlet{cfg: Config{RuntimeDir: t.TempDir()}, log: slog.New(slog.NewTextHandler(testWriter{t}, nil))}
	w := &workload{id: "ended", sb: &pgroup{}}
	p := ended(3, "exited with code 3")
	p.final = false
	n.terminate(w, p, time.Second, nil)
	select {
	case s := <-got:
		t.Fatalf("the stop of an ended run sent %v to the nexlet's own process group", s)
	case <-time.After(200 * time.Millisecond):
	}
}

// TestForkedLaunchFoundByUID: without cgroups (plain process groups), a deploy's first
// launch is forked and its nexlet dies before the pid record (here: the record removed
// after the crash, as if never written). The next nexlet, handed the start as a replay,
// finds the run by the workload's dynamic uid (the earliest process of it since its
// user was recorded) and adopts it: the same process, one run. Before, it found no pid
// record and no process group, and started the service a second time beside the first.
func TestForkedLaunchFoundByUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: dynamic uids")
	}
	fn := newFakeNode(t)
	cfg := Config{RuntimeDir: t.TempDir()}
	first := fn.startNexlet(cfg)
	if first.iso.mode() != "none" {
		t.Fatalf("isolation %s, want none", first.iso.mode())
	}
	const id = "forked"
	runs := filepath.Join(sharedDir(t), "runs")
	if err := os.WriteFile(runs, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(runs, 0o666); err != nil {
		t.Fatal(err)
	}
	req := startReq(protocol.LifecycleService, id, map[string]any{"uri": script(t, `echo run >> `+runs+`; exec sleep 600`)}, fn.creds())
	fn.mustStart(id, req)
	count := func() int { b, _ := os.ReadFile(runs); return strings.Count(string(b), "run\n") }
	testkit.Eventually(t, "the first run", func() bool { return count() == 1 })
	rec, ok := first.readPID(id)
	if !ok {
		t.Fatal("no pid record")
	}
	first.crash()
	if err := os.Remove(filepath.Join(first.recordDir(id), "pid")); err != nil {
		t.Fatal(err)
	}
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{id: req}
	fn.mu.Unlock()
	third := fn.startNexlet(cfg)
	t.Cleanup(func() { _ = third.StopWorkload(id, &protocol.StopWorkloadRequest{Namespace: testNS}) })
	testkit.Eventually(t, "the replayed service running", func() bool {
		s, ok := fn.summary(id)
		return ok && s.WorkloadState == protocol.WorkloadRunning
	})
	time.Sleep(time.Second) // a second run would have started by now
	if got := count(); got != 1 {
		t.Errorf("%d runs, want 1: the forked run adopted", got)
	}
	if now, ok := third.readPID(id); !ok || now != rec || !rec.Alive() {
		t.Errorf("pid record %v (%v), want the forked run %v, alive", now, ok, rec)
	}
}
