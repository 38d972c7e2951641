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

	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestDeployKilledBeforePidRecord: a deploy's first launch is forked and its nexlet is
// killed (-9) before it records the run's pid (held there by NEXD_TEST_HOLD), so the
// node never gets the nexlet's answer. The nexlet's successor must take the start over:
// a service's process (still running) is adopted as the workload, one process, one run,
// listed running and stopped by nexctl; a job whose run ended (exit 3, policy never)
// before the successor came is reported ended once with its exit code, never run again.
// The deploy's client gets the workload's id as started, within seconds. Before: the
// node kept the start in flight and did not replay it, the successor left the service
// running unmanaged (not listed, never stopped), the deploy waited out its minute of
// silence and the client got no answer within 60 s; the job was not reported.
func TestDeployKilledBeforePidRecord(t *testing.T) {
	needCgroupV1(t, "memory (the workload's group finds its run)")
	t.Parallel()
	// The start on the local channel, over NATS, or over NATS to a nexlet a restarted
	// nexd adopted (live_restore), which has no channel: before, one over NATS was not
	// handed over: the client waited out the silence and the forked run was left
	// running unlisted.
	for _, tc := range []struct{ lc, via string }{{"service", "local"}, {"job", "local"},
		{"service", "nats"}, {"job", "nats"}, {"service", "adopted"}} {
		lc := tc.lc
		t.Run(tc.lc+"/"+tc.via, func(t *testing.T) {
			t.Parallel()
			o := nodeOpts{env: []string{testhold.Env + "=" + testhold.LaunchForked}}
			switch tc.via {
			case "nats":
				o.env = append(o.env, "NEXD_LOCAL_STARTS=off")
			case "adopted":
				o.extra = []string{"--live-restore"}
			}
			n, stopped := nodeWithStops(t, o)
			n.waitNative(t)
			kill := func() { killNexlet(t, n, nil) }
			if tc.via == "adopted" {
				o.external, o.stateDir = n.natsURL, n.stateDir
				o.extra = []string{"--state", "kv", "--live-restore"}
				n = n.restart(t, o)
				if !strings.Contains(n.out.String(), "adopted the running nexlet") {
					t.Fatalf("the running nexlet was not adopted:\n%s", n.out.String())
				}
				n.waitNative(t)
				kill = func() { killAdoptedNexlet(t, n) }
			}
			c := newCrashLoop(t, "launchkill")
			type answer struct {
				out, errOut string
				code        int
				err         error
			}
			answered := make(chan answer, 1)
			args := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
			args = append(args, "--json", "workload", "run", "--name", "launchkill", "--lifecycle", lc,
				"--start-request", `{"restart": {"policy": "never"}}`, "--",
				"/bin/sh", "-c", `echo run >> "$1"; k=$(wc -l < "$1"); while [ ! -e "$2/release$k" ]; do sleep 0.05; done; exit 3`,
				c.marker, c.runsFile, c.dir)
			bin, home := nexctlBin(t), t.TempDir()
			go func() {
				var a answer
				a.out, a.errOut, a.code, a.err = runIn(home, nil, bin, args...)
				answered <- a
			}()
			testkit.EventuallyWithin(t, 60*time.Second, "the first launch forked, its nexlet held", func() bool {
				// Its mark, not its log line: the held start's log reaches nexd's output
				// only once the nexlet is gone.
				_, err := os.Stat(filepath.Join(n.stateDir, "run", "native", "test-held-"+testhold.LaunchForked))
				return err == nil && c.runs() == 1 && len(workloadMains(c)) == 1
			})
			before := workloadMains(c)
			t.Logf("held: runs %d, processes %v", c.runs(), before)
			if lc == "job" {
				c.release(t, 1, true)
				testkit.EventuallyWithin(t, 60*time.Second, "the job's run ended", func() bool { return len(workloadMains(c)) == 0 })
			}
			killed := time.Now()
			kill()
			var a answer
			select {
			case a = <-answered:
			case <-time.After(90 * time.Second):
				t.Fatal("the deploy never returned")
			}
			took := time.Since(killed)
			t.Logf("the deploy answered %s after the kill: exit %d", took.Round(time.Millisecond), a.code)
			var r runResult
			if a.err != nil || a.code != 0 || json.Unmarshal([]byte(a.out), &r) != nil || r.ID == "" {
				time.Sleep(5 * time.Second)
				t.Logf("then: %d runs, processes %v, the node lists %+v", c.runs(), workloadMains(c), n.workloads(t))
				t.Fatalf("the deploy's client got no start %s after the kill: exit %d, err %v\nstdout: %s\nstderr: %s",
					took.Round(time.Second), a.code, a.err, a.out, a.errOut)
			}
			if took > 30*time.Second {
				t.Errorf("the deploy answered %s after the kill: it waited out the nexlet's silence", took.Round(time.Second))
			}
			c.id = r.ID
			if lc == "job" {
				ev := endedOnce(t, stopped, c.id)
				if ev.Metadata["exit_code"] != "3" {
					t.Errorf("the job ended with %q (%s), want 3", ev.Metadata["exit_code"], ev.Metadata["reason"])
				}
				if got := c.runs(); got != 1 {
					t.Errorf("the job ran %d times, want once", got)
				}
				if m := workloadMains(c); len(m) != 0 {
					t.Errorf("processes after the job ended: %v", m)
				}
				return
			}
			testkit.EventuallyWithin(t, 60*time.Second, "the service listed running", func() bool {
				w, ok := c.listed(t, n)
				return ok && w.State == "running"
			})
			time.Sleep(2 * time.Second) // a second run would have started by now
			if m := workloadMains(c); !slices.Equal(m, before) || c.runs() != 1 {
				t.Fatalf("after the kill: processes %v (forked %v), %d runs; want the forked one, one run", m, before, c.runs())
			}
			if w, _ := c.listed(t, n); w.Restarts != 0 {
				t.Errorf("the adopted run listed with %d restarts, want 0", w.Restarts)
			}
			n.mustCtl(t, "workload", "stop", c.id)
			testkit.EventuallyWithin(t, 30*time.Second, "the service stopped", func() bool { return len(workloadMains(c)) == 0 })
			if _, ok := c.listed(t, n); ok {
				t.Error("the stopped service is still listed")
			}
			if got := c.runs(); got != 1 {
				t.Errorf("the service ran %d times, want once", got)
			}
		})
	}
}

// killAdoptedNexlet kills (-9) the native nexlet n adopted (not its child: the one its
// record names) and waits for n's own.
func killAdoptedNexlet(t *testing.T, n *node) {
	t.Helper()
	rec, ok := supervise.ReadRecord(filepath.Join(n.stateDir, "nexlets"), "native")
	if !ok || nexletPID(n.cmd.Process.Pid) != 0 {
		t.Fatalf("no adopted native nexlet (record %+v, %v; nexd's own nexlet %d)", rec, ok, nexletPID(n.cmd.Process.Pid))
	}
	if err := syscall.Kill(rec.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool { return nexletPID(n.cmd.Process.Pid) != 0 })
}

// workloadMains is c.mains() without the deploying nexctl, whose arguments hold the
// marker too while it runs.
func workloadMains(c crashLoop) []int {
	return slices.DeleteFunc(c.mains(), func(p int) bool {
		b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p), "comm"))
		return strings.TrimSpace(string(b)) == "nexctl"
	})
}

// TestFirstLineBeforePidRecord: a workload's first line reaches its log feed while its
// nexlet is still between the fork and the run's pid record (held there by
// NEXD_TEST_HOLD): the nexlet watches the output FIFOs from before the fork. Before, it
// took them only after the fork's hand-back, the oom score and the pid record, and no
// line came while it was held (a placement's announcement waited out those steps: 0.8-2
// ms at load 5).
func TestFirstLineBeforePidRecord(t *testing.T) {
	needCgroupV1(t, "memory (the held run's successor finds it)")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), env: []string{testhold.Env + "=" + testhold.LaunchForked}})
	n.waitReady(t)
	n.waitNative(t)
	nc := testnats.Connect(t, s)
	logs, err := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, nc)
	answered := make(chan error, 1)
	args := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
	args = append(args, "workload", "run", "--name", "firstline", "--", "/bin/sh", "-c", "echo first-line; exec sleep 600")
	bin, home := nexctlBin(t), t.TempDir()
	go func() {
		_, errOut, code, err := runIn(home, nil, bin, args...)
		if err == nil && code != 0 {
			err = fmt.Errorf("exit %d: %s", code, errOut)
		}
		answered <- err
	}()
	testkit.EventuallyWithin(t, 60*time.Second, "the launch forked, its nexlet held", func() bool {
		_, err := os.Stat(filepath.Join(n.stateDir, "run", "native", "test-held-"+testhold.LaunchForked))
		return err == nil
	})
	m, err := logs.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatalf("no line on the log feed while the nexlet is held after the fork: %v", err)
	}
	if string(m.Data) != "first-line" {
		t.Fatalf("line %q on %s, want first-line", m.Data, m.Subject)
	}
	if _, err := os.Stat(filepath.Join(n.stateDir, "run", "native", "test-held-"+testhold.LaunchForked)); err != nil {
		t.Fatalf("the hold's mark is gone: %v", err)
	}
	// The successor takes the held start over; the deploy is answered.
	killNexlet(t, n, nil)
	select {
	case err := <-answered:
		if err != nil {
			t.Fatalf("deploy after the held nexlet's kill: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("the deploy never returned")
	}
}
