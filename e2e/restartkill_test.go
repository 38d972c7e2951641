package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// crashLoop is a workload whose every run appends a line to a file (its starts,
// counted) and exits 3 once the test releases it: run k when the file release<k>
// exists in dir.
type crashLoop struct {
	id, marker, runsFile, dir string
}

// startCrashLoop deploys a crashLoop of lifecycle lc with the restart policy restart
// (the start request's "restart" object).
func startCrashLoop(t *testing.T, n *node, lc, restart string) crashLoop {
	t.Helper()
	return startLoop(t, n, lc, restart, 3)
}

// startLoop is startCrashLoop whose runs exit with code once released (extra: more
// `workload run` flags).
func startLoop(t *testing.T, n *node, lc, restart string, code int, extra ...string) crashLoop {
	t.Helper()
	c := newCrashLoop(t, "crashloop")
	c.id = n.runWorkload(t, append(extra, "--name", "crashloop", "--lifecycle", lc, "--start-request", `{"restart":`+restart+`}`, "--",
		"/bin/sh", "-c", `echo run >> "$1"; k=$(wc -l < "$1"); while [ ! -e "$2/release$k" ]; do sleep 0.05; done; exit `+strconv.Itoa(code),
		c.marker, c.runsFile, c.dir)...).ID
	return c
}

// startDeafService deploys a service named name that ignores SIGTERM, with stop grace
// grace: a stop ends it only by the kill at the grace's end.
func startDeafService(t *testing.T, n *node, name, grace string) crashLoop {
	t.Helper()
	c := newCrashLoop(t, name)
	c.id = n.runWorkload(t, "--name", name, "--lifecycle", "service", "--start-request", `{"stop_grace": "`+grace+`"}`, "--",
		"/bin/sh", "-c", `echo run >> "$1"; trap '' TERM; while :; do sleep 0.05; done`, c.marker, c.runsFile).ID
	return c
}

// newCrashLoop makes a crashLoop's marker (named after kind), directory and runs file,
// for a workload yet to deploy.
func newCrashLoop(t *testing.T, kind string) crashLoop {
	t.Helper()
	c := crashLoop{marker: fmt.Sprintf("nexd-e2e-%s-%d", kind, time.Now().UnixNano()), dir: testkit.PublicDir(t)}
	c.runsFile = testkit.WriteFile(t, filepath.Join(c.dir, "runs"), "")
	if err := os.Chmod(c.runsFile, 0o666); err != nil { // each run may have another dynamic uid
		t.Fatal(err)
	}
	return c
}

// runs counts the workload's starts so far.
func (c crashLoop) runs() int {
	b, _ := os.ReadFile(c.runsFile)
	return strings.Count(string(b), "run\n")
}

// release lets run k (and every later one, with all) exit 3.
func (c crashLoop) release(t *testing.T, k int, all bool) {
	t.Helper()
	last := k
	if all {
		last = k + 20
	}
	for i := k; i <= last; i++ {
		testkit.WriteFile(t, filepath.Join(c.dir, "release"+strconv.Itoa(i)), "")
	}
}

// mains lists the workload's live main processes: its shells whose parent is not one
// of them (a shell's fork before it execs sleep or wc is not another run).
func (c crashLoop) mains() []int {
	all := markerPIDs(c.marker)
	var out []int
	for _, p := range all {
		ppid, err := strconv.Atoi(procStatus(p, "PPid"))
		if err == nil && !slices.Contains(all, ppid) {
			out = append(out, p)
		}
	}
	return out
}

// listed returns the node's listing of the workload.
func (c crashLoop) listed(t *testing.T, n *node) (control.Workload, bool) {
	for _, w := range n.workloads(t) {
		if w.ID == c.id {
			return w, true
		}
	}
	return control.Workload{}, false
}

// endsAtLimit checks that the workload ended once, with exit code 3 and its restart
// limit of max reached, after max+1 runs, and that none of its processes is left.
func (c crashLoop) endsAtLimit(t *testing.T, stopped *nats.Subscription, max int) {
	t.Helper()
	ev := endedOnce(t, stopped, c.id)
	limit := fmt.Sprintf("restart limit of %d reached", max)
	if ev.Metadata["exit_code"] != "3" || !strings.Contains(ev.Metadata["reason"], limit) {
		t.Errorf("it ended with %q (%s), want 3 with its %s", ev.Metadata["exit_code"], ev.Metadata["reason"], limit)
	}
	if r := c.runs(); r != max+1 {
		t.Errorf("it ran %d times, want %d (its run and its %d restarts)", r, max+1, max)
	}
	if m := c.mains(); len(m) != 0 {
		t.Errorf("processes once it ended: %v", m)
	}
}

// killNexlet kills the native nexlet of n with SIGKILL, runs then (if not nil) and
// waits for the next nexlet.
func killNexlet(t *testing.T, n *node, then func()) {
	t.Helper()
	old := nexletPID(n.cmd.Process.Pid)
	if old == 0 {
		t.Fatal("native nexlet not found")
	}
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if then != nil {
		then()
	}
	testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool {
		next := nexletPID(n.cmd.Process.Pid)
		return next != 0 && next != old
	})
}

// firstRunFailed starts a node (with its state in KV, as TestNexletCrashKeepsWorkloads)
// and a subscription to its WORKLOADSTOPPED events, deploys a crashLoop (lc, restart:
// startCrashLoop) and lets its first run fail.
func firstRunFailed(t *testing.T, lc, restart string) (*node, *nats.Subscription, crashLoop) {
	t.Helper()
	n, stopped := nodeWithStops(t, nodeOpts{})
	c := startCrashLoop(t, n, lc, restart)
	testkit.EventuallyWithin(t, 60*time.Second, "the first run", func() bool { return c.runs() == 1 })
	c.release(t, 1, false)
	return n, stopped, c
}

// nodeWithStops starts a node (with its state in KV, as TestNexletCrashKeepsWorkloads;
// o's env and flags added) and a subscription to its WORKLOADSTOPPED events.
func nodeWithStops(t *testing.T, o nodeOpts) (*node, *nats.Subscription) {
	t.Helper()
	s := testnats.Start(t, testnats.Options{})
	o.external, o.extra = s.ClientURL(), append([]string{"--state", "kv"}, o.extra...)
	n := startNode(t, o)
	n.waitReady(t)
	nc := testnats.Connect(t, s)
	stopped, err := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, nc)
	return n, stopped
}

// endedOnce waits for the WORKLOADSTOPPED of id, then fails if another comes within a
// second.
func endedOnce(t *testing.T, stopped *nats.Subscription, id string) protocol.WorkloadStoppedEvent {
	t.Helper()
	var evs []protocol.WorkloadStoppedEvent
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		wait := time.Second
		if len(evs) == 0 {
			wait = time.Until(deadline)
		}
		m, err := stopped.NextMsg(wait)
		if err != nil {
			break
		}
		var e protocol.WorkloadStoppedEvent
		if json.Unmarshal(m.Data, &e) == nil && e.ID == id {
			evs = append(evs, e)
		}
	}
	switch len(evs) {
	case 0:
		t.Fatalf("no WORKLOADSTOPPED of %s", id)
	case 1:
	default:
		t.Errorf("%d WORKLOADSTOPPED of %s, want 1: %+v", len(evs), id, evs)
	}
	return evs[0]
}

// TestNexletKillDuringRestartBackoff: a job whose run failed waits out its restart
// backoff (10 s) when its nexlet is killed (-9). The next nexlet makes the restart its
// policy allows, counting it, once the rest of the backoff is over, measured from the
// recorded end: a budget of one restart means two runs in all, one process at a time,
// and one end reported, with the limit reached; the restart runs no sooner than 10 s
// after the first run was let go (its end came after that), nor long after. Before,
// the restart died with the nexlet: the next one found no process, no exit record (the
// dead nexlet had reaped it) and no record of the restart, and reported the job lost
// (exit code -1) after one run; then it was made at once, 0.5 s after the end
// (the backoff's remainder not waited out).
func TestNexletKillDuringRestartBackoff(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const backoff = 10 * time.Second
	n, stopped, c := firstRunFailed(t, "job", `{"policy": "on-failure", "max": 1, "backoff": "10s"}`)
	released := time.Now() // a moment after the release, before the end
	testkit.EventuallyWithin(t, 60*time.Second, "the job waits out its restart's backoff", func() bool {
		w, ok := c.listed(t, n)
		return ok && w.State == string(protocol.WorkloadStarting) && w.Restarts == 1 && len(c.mains()) == 0
	})
	killNexlet(t, n, nil)
	var restarted time.Time
	testkit.EventuallyWithin(t, 60*time.Second, "the restart run by the next nexlet", func() bool {
		if m, err := stopped.NextMsg(10 * time.Millisecond); err == nil {
			t.Fatalf("the job ended before its restart ran (%d runs): %s", c.runs(), m.Data)
		}
		restarted = time.Now()
		return c.runs() == 2
	})
	if after := restarted.Sub(released); after < backoff-time.Second {
		t.Errorf("the restart ran %s after the first run was let go, before its %s backoff was over", after.Round(time.Millisecond), backoff)
	} else if after > backoff+20*time.Second {
		t.Errorf("the restart ran %s after the first run was let go: its %s backoff was waited out again after the kill", after.Round(time.Millisecond), backoff)
	}
	if m := c.mains(); len(m) != 1 {
		t.Errorf("the restart runs as %d processes %v, want 1", len(m), m)
	}
	if w, ok := c.listed(t, n); !ok || w.Restarts != 1 {
		t.Errorf("the restart listed as %+v, want restarts 1", w)
	}
	c.release(t, 2, true)
	c.endsAtLimit(t, stopped, 1)
}

// TestRelaunchForkedBeforePidRecord: a job with a budget of two restarts on failure
// fails; its nexlet forks the first restart and is killed (-9) before it records that
// run's pid (held there by NEXD_TEST_HOLD), and the run fails too before the next
// nexlet comes: nexd reaps it and records its end. The next nexlet must take that run
// as the first restart (its launch record bounds the process: the job's dynamic uid,
// started from the record's tick on) and make only the second: three runs in all, one
// end with the limit reached. Before, the restart was still due by the records, and
// the next nexlet made it a second time: four runs for a budget of two. The same
// nexlet killed after the launch record and before the fork leaves no such process:
// the next one makes the first restart, once, three runs in all again (none lost).
// nameduser: the job runs as a named user (nobody: its uid is not the workload's
// alone) and its forked restart still runs when the nexlet is killed: the next nexlet
// finds it in the workload's cgroup (a process group leader started since the launch
// record), adopts it as the first restart, three runs in all; before, it took that run
// for a leftover of the failed one, killed it and made the restart again: four runs.
func TestRelaunchForkedBeforePidRecord(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	for _, c := range []struct {
		name, hold string
		forked     bool
		user       string // a named user; its run stays alive across the kill
	}{{testhold.RelaunchForked, testhold.RelaunchForked, true, ""}, {testhold.RelaunchRecorded, testhold.RelaunchRecorded, false, ""},
		{"nameduser", testhold.RelaunchForked, true, "nobody"}} {
		t.Run(c.name, func(t *testing.T) {
			if c.user != "" {
				needCgroupV1(t, "memory (the workload's group finds its run)")
			}
			t.Parallel()
			o := nodeOpts{env: []string{testhold.Env + "=" + c.hold}}
			var extra []string
			if c.user != "" {
				o.extra, extra = []string{"--workload-users", c.user}, []string{"--user", c.user}
			}
			n, stopped := nodeWithStops(t, o)
			l := startLoop(t, n, "job", `{"policy": "on-failure", "max": 2, "backoff": "10ms"}`, 3, extra...)
			testkit.EventuallyWithin(t, 60*time.Second, "the first run", func() bool { return l.runs() == 1 })
			l.release(t, 1, false)
			runs := 1
			if c.forked {
				runs = 2
			}
			testkit.EventuallyWithin(t, 60*time.Second, "the first restart's nexlet held", func() bool {
				return strings.Contains(n.out.String(), "hold="+c.hold) && l.runs() == runs
			})
			if c.forked && c.user == "" {
				l.release(t, 2, false)
				testkit.EventuallyWithin(t, 60*time.Second, "the first restart's run ended", func() bool { return len(l.mains()) == 0 })
			}
			killNexlet(t, n, nil)
			if c.user != "" {
				// Until the next nexlet's replay adopted the forked restart (or made it
				// again: a third run). Not a fixed 2 s: under load the next nexlet came
				// 2.1 s after the kill, the run was let go before, and an ended run of a
				// shared uid leaves no trace to adopt (README: what remains), four runs.
				testkit.EventuallyWithin(t, 60*time.Second, "the next nexlet's replay of the forked restart", func() bool {
					return strings.Contains(n.out.String(), "that run is the restart") || l.runs() > 2
				})
				if r := l.runs(); r != 2 {
					t.Errorf("%d runs after the kill, want 2: the forked restart adopted", r)
				}
				l.release(t, 2, false)
			}
			l.release(t, runs+1, true)
			l.endsAtLimit(t, stopped, 2)
		})
	}
}

// TestOOMKillRecordedAheadOfReap: a job without a restart policy outgrows its memory
// limit (64M, tail /dev/zero) and the OOM killer kills it; its nexlet records the exit
// ahead of the reap, reaps it, and is killed (-9) before it records the end itself (held
// there by NEXD_TEST_HOLD). The next nexlet reports the end from that record: exit code
// 137, killed by the OOM killer, as a nexlet that lived would have. Before, the record
// ahead of the reap said only "killed by signal killed".
func TestOOMKillRecordedAheadOfReap(t *testing.T) {
	needCgroupV1(t, "memory (root)")
	t.Parallel()
	n, stopped := nodeWithStops(t, nodeOpts{env: []string{testhold.Env + "=" + testhold.ExitReaped},
		extra: []string{"--workload-default-memory-max", "64M"}})
	// tail keeps a line without newline in memory: /dev/zero has none.
	hog := n.runWorkload(t, "--name", "hog", "--lifecycle", "job", "--start-request", `{"restart": {"policy": "never"}}`,
		"--", "/usr/bin/tail", "/dev/zero")
	testkit.EventuallyWithin(t, 60*time.Second, "the hog reaped, its nexlet held before it recorded the end", func() bool {
		return strings.Contains(n.out.String(), "hold="+testhold.ExitReaped)
	})
	killNexlet(t, n, nil)
	ev := endedOnce(t, stopped, hog.ID)
	if ev.Metadata["exit_code"] != "137" || !strings.Contains(ev.Metadata["reason"], "OOM killer") {
		t.Errorf("the hog was reported ending with %q (%s), want 137 by the OOM killer", ev.Metadata["exit_code"], ev.Metadata["reason"])
	}
}

// TestRestartCountSurvivesNexletKill: a crash-looping service with a budget of two
// restarts has its nexlet killed (-9) while its first restart runs. The next nexlet
// adopts that run (the same process, listed with one restart), and its restarts go on
// counting from there: two restarts in all, three runs, then the end with the limit
// reached. Before, the adopted workload's restarts began again from zero, and it ran
// four times (three restarts against a budget of two).
func TestRestartCountSurvivesNexletKill(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n, stopped, c := firstRunFailed(t, "service", `{"policy": "on-failure", "max": 2}`)
	var before []int
	testkit.EventuallyWithin(t, 60*time.Second, "the service's first restart runs", func() bool {
		w, ok := c.listed(t, n)
		before = c.mains()
		return c.runs() == 2 && len(before) == 1 && ok && w.State == string(protocol.WorkloadRunning) && w.Restarts == 1
	})
	killNexlet(t, n, nil)
	testkit.EventuallyWithin(t, 60*time.Second, "the restart adopted by the next nexlet", func() bool {
		w, ok := c.listed(t, n)
		return ok && w.State == string(protocol.WorkloadRunning)
	})
	if m := c.mains(); !slices.Equal(m, before) || c.runs() != 2 {
		t.Fatalf("after the kill: processes %v (before %v), %d runs, want the same process and 2 runs", m, before, c.runs())
	}
	if w, _ := c.listed(t, n); w.Restarts != 1 {
		t.Errorf("the adopted run listed with %d restarts, want 1", w.Restarts)
	}
	c.release(t, 2, true)
	c.endsAtLimit(t, stopped, 2)
}

// TestJobEndWhileNexletDeadRestartsByPolicy: a job with a budget of two restarts on
// failure fails (exit 3) right after its nexlet was killed (-9), while its first
// restart runs and before the next nexlet adopts it: nexd reaps it and records its exit.
// The next nexlet honours the policy as the dead one would have: it makes the second
// restart, counting the first, three runs in all, one end reported with the limit
// reached. Before, it reported the failed run's exit code and never made the restart
// the budget still allowed (and a service's start after such an end was not counted).
func TestJobEndWhileNexletDeadRestartsByPolicy(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n, stopped, c := firstRunFailed(t, "job", `{"policy": "on-failure", "max": 2}`)
	testkit.EventuallyWithin(t, 60*time.Second, "the job's first restart runs", func() bool {
		return c.runs() == 2 && len(c.mains()) == 1
	})
	// It ends at once, before the next nexlet is even started.
	killNexlet(t, n, func() { c.release(t, 2, true) })
	c.endsAtLimit(t, stopped, 2)
}

// TestServiceEndWhileNexletDeadFollowsPolicy: services whose restart policy does not
// start them again end while their nexlet is dead (killed -9), before the next one
// adopts them: one with policy never fails (exit 3), one with on-failure exits 0.
// nexd reaps each and records its exit; the next nexlet reports each end once, with
// its exit code, and starts neither again, as their nexlet would have had it watched.
// Before, the next nexlet started both again whatever their policy said.
func TestServiceEndWhileNexletDeadFollowsPolicy(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n, stopped := nodeWithStops(t, nodeOpts{})
	never := startCrashLoop(t, n, "service", `{"policy": "never"}`) // exits 3 once released
	clean := startLoop(t, n, "service", `{"policy": "on-failure"}`, 0)
	testkit.EventuallyWithin(t, 60*time.Second, "both first runs", func() bool {
		return never.runs() == 1 && clean.runs() == 1 && len(never.mains()) == 1 && len(clean.mains()) == 1
	})
	killNexlet(t, n, func() {
		never.release(t, 1, false)
		clean.release(t, 1, false)
	})
	// Both ends, each once (a second one within a second of the last would be a
	// second run's).
	ends := map[string][]protocol.WorkloadStoppedEvent{}
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		wait := time.Until(deadline)
		if len(ends[never.id]) > 0 && len(ends[clean.id]) > 0 {
			wait = time.Second
		}
		m, err := stopped.NextMsg(wait)
		if err != nil {
			break
		}
		var e protocol.WorkloadStoppedEvent
		if json.Unmarshal(m.Data, &e) == nil {
			ends[e.ID] = append(ends[e.ID], e)
		}
	}
	for _, c := range []struct {
		loop crashLoop
		code string
	}{{never, "3"}, {clean, "0"}} {
		evs := ends[c.loop.id]
		if len(evs) != 1 {
			t.Errorf("%s: %d WORKLOADSTOPPED, want 1: %+v", c.loop.id, len(evs), evs)
			continue
		}
		if evs[0].Metadata["exit_code"] != c.code {
			t.Errorf("%s ended with %q (%s), want %s", c.loop.id, evs[0].Metadata["exit_code"], evs[0].Metadata["reason"], c.code)
		}
	}
	for _, c := range []crashLoop{never, clean} {
		if r := c.runs(); r != 1 {
			t.Errorf("%s ran %d times, want once: its policy does not start it again", c.id, r)
		}
		if m := c.mains(); len(m) != 0 {
			t.Errorf("%s: processes after its end: %v", c.id, m)
		}
	}
}
