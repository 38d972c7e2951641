package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// noWaitStopRounds is how many stops each case answers and then kills right after.
const noWaitStopRounds = 8

// TestNoWaitStopSurvivesKillRightAfterAnswer: `nexctl workload stop --no-wait` is
// answered ("stopping") once the owning nexlet recorded the stop, so a kill -9 right
// after the answer, of the native nexlet or of nexd, never leaves the stopped service
// running or starts it again. Each round stops one of the services the way nexctl
// does (UNDEPLOY with Nex-Progress, in-process so the kill follows the answer within
// a fraction of a millisecond) and kills at the answer; the next nexlet or nexd comes
// up, and once every round is done the test counts the stopped services still running,
// run again or listed (0), and the services not stopped that were lost (0). Before,
// the node said "stopping" before it forwarded the stop, and a kill in that hop, or
// before the nexlet wrote its stop record, lost the stop: the next nexlet adopted the
// service and it ran on.
func TestNoWaitStopSurvivesKillRightAfterAnswer(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	for _, kill := range []string{"nexlet", "nexd"} {
		t.Run(kill, func(t *testing.T) {
			s := testnats.Start(t, testnats.Options{})
			nc := testnats.Connect(t, s)
			dir := t.TempDir()
			o := nodeOpts{external: s.ClientURL(), stateDir: dir, extra: []string{"--state", "kv", "--agent-restart-limit", "50"}}
			n := startNode(t, o)
			n.waitReady(t)
			o.cgroup = n.cgroup
			loops := make([]crashLoop, noWaitStopRounds+1) // the last one is never stopped
			for i := range loops {
				loops[i] = startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
			}
			testkit.EventuallyWithin(t, 60*time.Second, "the services run", func() bool {
				for _, c := range loops {
					if c.runs() != 1 || len(c.mains()) != 1 {
						return false
					}
				}
				return true
			})
			answered := 0
			for i, c := range loops[:noWaitStopRounds] {
				victim, nexlet := n.cmd.Process.Pid, 0
				if kill == "nexlet" {
					// nexd's child; after a kill of nexd the next one adopts it instead.
					if nexlet = nexletPID(n.cmd.Process.Pid); nexlet == 0 {
						t.Fatal("native nexlet not found")
					}
					victim = nexlet
				}
				if noWaitStop(t, nc, c.id, victim) {
					answered++
				}
				switch kill {
				case "nexlet":
					testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool {
						next := nexletPID(n.cmd.Process.Pid)
						return next != 0 && next != nexlet
					})
				case "nexd":
					n.wait(t, 30*time.Second)
					n = startNode(t, o)
					n.waitReady(t)
				}
				// The next nexlet registered and took the rest back: every service not yet
				// stopped is listed again before the next round's kill.
				testkit.EventuallyWithin(t, 60*time.Second, fmt.Sprintf("round %d: the services not stopped listed again", i), func() bool {
					ws := n.workloads(t)
					for _, rest := range loops[i+1:] {
						if !slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == rest.id }) {
							return false
						}
					}
					return true
				})
			}
			// Every stopped service ends within its grace (the default, 10 s) of the next
			// nexlet's start: a stop it finds recorded is finished.
			stoppedGone := func() bool {
				for _, c := range loops[:noWaitStopRounds] {
					if len(c.mains()) != 0 {
						return false
					}
				}
				return true
			}
			deadline := time.Now().Add(30 * time.Second)
			for time.Now().Before(deadline) && !stoppedGone() {
				time.Sleep(100 * time.Millisecond)
			}
			ws := n.workloads(t)
			ranOn, ranAgain, listed := 0, 0, 0
			for _, c := range loops[:noWaitStopRounds] {
				if len(c.mains()) != 0 {
					ranOn++
				}
				if c.runs() > 1 {
					ranAgain++
				}
				if slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == c.id }) {
					listed++
				}
			}
			last := loops[noWaitStopRounds]
			lost := 0
			if len(last.mains()) != 1 || !slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == last.id }) {
				lost = 1
			}
			t.Logf("kill -9 of %s right after %d of %d no-wait stops were answered: %d stopped service(s) running on, %d run again, %d listed; %d of 1 not stopped lost (runs %d)",
				kill, answered, noWaitStopRounds, ranOn, ranAgain, listed, lost, last.runs())
			if answered != noWaitStopRounds {
				t.Errorf("%d of %d no-wait stops answered \"stopping\"", answered, noWaitStopRounds)
			}
			if ranOn+ranAgain+listed+lost != 0 {
				t.Errorf("stops lost to a kill right after their answer: %d running on, %d run again, %d listed; %d running service lost", ranOn, ranAgain, listed, lost)
			}
		})
	}
}

// noWaitStop sends the stop nexctl's --no-wait sends and kills victim (-9) the moment
// the node says the workload is stopping; true if it did.
func noWaitStop(t *testing.T, nc *nats.Conn, id string, victim int) bool {
	t.Helper()
	data, err := json.Marshal(protocol.StopWorkloadRequest{Namespace: protocol.SystemNamespace})
	if err != nil {
		t.Fatal(err)
	}
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	m := &nats.Msg{Subject: protocol.UndeploySubject(protocol.SystemNamespace, id), Reply: inbox, Data: data,
		Header: nats.Header{protocol.HeaderProgress: {"1"}}}
	if err := nc.PublishMsg(m); err != nil {
		t.Fatal(err)
	}
	r, err := sub.NextMsg(20 * time.Second)
	if err != nil {
		t.Fatalf("stop %s: no answer: %v", id, err)
	}
	stopping := r.Header.Get(protocol.HeaderProgress) != "" && len(r.Data) == 0
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !stopping {
		t.Logf("stop %s: answered %q %v, not stopping", id, r.Data, r.Header)
	}
	return stopping
}

// TestConcurrentNoWaitStopsRecordedOnce: two `nexctl workload stop --no-wait` of the
// same workload sent at once are both told "stopping", recorded, and the workload is
// stopped once. Before, the native nexlet said it recorded only the stop its workload's
// supervisor took; the other (pending behind it, or sent while the first one's grace
// ran) was never said recorded, so the node told its client after its 2 s bound that
// the stop was not confirmed (Nexd-Stop-Unrecorded), and nexctl exited 1.
func TestConcurrentNoWaitStopsRecordedOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	c := newCrashLoop(t, "twostops")
	terms := testkit.WriteFile(t, filepath.Join(c.dir, "terms"), "")
	if err := os.Chmod(terms, 0o666); err != nil {
		t.Fatal(err)
	}
	// It takes its SIGTERM (counted) and runs on: its stop lasts the 3 s grace, so the
	// second stop comes while the first one is under way.
	c.id = n.runWorkload(t, "--name", "twostops", "--lifecycle", "service", "--start-request", `{"stop_grace": "3s"}`, "--",
		"/bin/sh", "-c", `echo run >> "$1"; trap 'echo term >> "$2"' TERM; while :; do sleep 0.05; done`,
		c.marker, c.runsFile, terms).ID
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool { return c.runs() == 1 && len(c.mains()) == 1 })
	waitTrapped(t, "the service", c.mains)

	data, err := json.Marshal(protocol.StopWorkloadRequest{Namespace: protocol.SystemNamespace})
	if err != nil {
		t.Fatal(err)
	}
	const stops = 2
	subs := make([]*nats.Subscription, stops)
	for i := range subs {
		inbox := nc.NewInbox()
		if subs[i], err = nc.SubscribeSync(inbox); err != nil {
			t.Fatal(err)
		}
		if err := nc.PublishMsg(&nats.Msg{Subject: protocol.UndeploySubject(protocol.SystemNamespace, c.id), Reply: inbox, Data: data,
			Header: nats.Header{protocol.HeaderProgress: {"1"}}}); err != nil {
			t.Fatal(err)
		}
	}
	recorded, unrecorded, stopped := 0, 0, 0
	for i, sub := range subs {
		for {
			m, err := sub.NextMsg(30 * time.Second)
			if err != nil {
				t.Fatalf("stop %d: no answer: %v", i, err)
			}
			if m.Header.Get(protocol.HeaderProgress) != "" && len(m.Data) == 0 {
				switch {
				case m.Header.Get(protocol.HeaderStopUnrecorded) != "":
					unrecorded++
					t.Logf("stop %d: stopping, unrecorded: %s", i, m.Header.Get(protocol.HeaderStopUnrecorded))
				case m.Header.Get(protocol.HeaderStopRecorded) != "":
					recorded++
				}
				continue
			}
			var resp protocol.StopWorkloadResponse
			if err := json.Unmarshal(m.Data, &resp); err != nil {
				t.Fatalf("stop %d: answer %q: %v", i, m.Data, err)
			}
			if resp.Stopped {
				stopped++
			}
			t.Logf("stop %d answered: stopped=%v %s", i, resp.Stopped, resp.Message)
			break
		}
	}
	b, _ := os.ReadFile(terms)
	sigterms := strings.Count(string(b), "term\n")
	t.Logf("%d concurrent no-wait stops: %d told stopping (recorded), %d unrecorded, %d answered stopped; the service had %d SIGTERM(s), %d run(s), %d main(s) left",
		stops, recorded, unrecorded, stopped, sigterms, c.runs(), len(c.mains()))
	if recorded != stops || unrecorded != 0 {
		t.Errorf("%d of %d stops told stopping recorded, %d unrecorded", recorded, stops, unrecorded)
	}
	if stopped != stops || sigterms != 1 || c.runs() != 1 || len(c.mains()) != 0 {
		t.Errorf("want both stops answered stopped, the service stopped once (1 SIGTERM, 1 run, gone)")
	}
}
