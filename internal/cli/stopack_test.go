package cli

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestNoWaitStopRecordedOrNot: `workload stop --no-wait` returns on the node's
// "stopping": exit 0 when the owning nexlet recorded the stop (Nexd-Stop-Recorded) or
// the node says nothing of a record (an upstream-SDK nexlet, an older node); exit 1,
// quoting the node's reason, when the node says the nexlet did not confirm its record
// (Nexd-Stop-Unrecorded): a crash now may undo that stop, and a script must not take it
// for done. Without --no-wait nexctl waits for the answer either way.
func TestNoWaitStopRecordedOrNot(t *testing.T) {
	t.Parallel()
	const id = "aDqYSZ2aIvLTDISr3fAsgI"
	const why = "nexlet local:native (agent A1) did not confirm within 2s that it recorded the stop"
	for _, c := range []struct {
		name     string
		word     nats.Header
		wordOnly bool
		args     []string
		code     int
		want     string
	}{
		{"recorded", nats.Header{protocol.HeaderStopRecorded: {"local:native"}}, true, []string{"--no-wait"}, 0, "is stopping"},
		{"no word on a record", nats.Header{}, true, []string{"--no-wait"}, 0, "is stopping"},
		{"unrecorded", nats.Header{protocol.HeaderStopUnrecorded: {why}}, true, []string{"--no-wait"}, 1, why},
		{"unrecorded, waited for", nats.Header{protocol.HeaderStopUnrecorded: {why}}, false, nil, 0, "successfully stopped"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := testnats.Start(t, testnats.Options{NoJetStream: true})
			a := newFakeNode(t, testnats.Connect(t, s), "NAAA1", nil)
			a.stopOK, a.stopWord, a.wordOnly = true, c.word, c.wordOnly
			a.start()
			args := append([]string{"workload", "stop"}, c.args...)
			out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), append(args, id)...)...)
			if code != c.code || !strings.Contains(out+errOut, c.want) {
				t.Errorf("exit %d, %q %q; want exit %d with %q", code, out, errOut, c.code, c.want)
			}
			if c.code == 1 && !strings.Contains(errOut, "not confirmed recorded") {
				t.Errorf("the error does not say the stop is not confirmed recorded: %q", errOut)
			}
		})
	}
}

// TestStopHolderErrorReported: the node holding a workload answers its stop with an
// error (500: a nexd node that stopped while its nexlet had not answered), naming
// itself as its stop answers do; another node answers "not found". nexctl reports the
// holder's error at once, naming the node, with the outcome unknown (exit 3: the stop
// may have reached the nexlet), never "not found" or "still stopping". Before, after
// the holder's "stopping" word the error was set aside and nexctl waited out its
// 5m30s bound (here the run's 30 s context), then said "was not stopped: workload not
// found", exit 1; the holder named by the listing without a word got its error read as
// any node's, unnamed, exit 1.
func TestStopHolderErrorReported(t *testing.T) {
	t.Parallel()
	const id = "aDqYSZ2aIvLTDISr3fAsgI"
	const failure = "internal server error (error_id E1 in the node's log)"
	def := "default"
	for _, c := range []struct {
		name string
		word bool // the holder says it is stopping it first; else the listing names it
	}{{"after its word", true}, {"named by the listing", false}} {
		t.Run(c.name, func(t *testing.T) {
			s := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, s)
			holder := newFakeNode(t, nc, "HOLDER", nil)
			holder.stopFail = failure
			if c.word {
				holder.stopWord = nats.Header{protocol.HeaderNode: {"HOLDER"}}
			} else {
				holder.drains = true // its WPING answers name it
				holder.workloads = []protocol.WorkloadSummary{{ID: id, Name: "web", Namespace: &def, WorkloadType: "native",
					WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
			}
			holder.start()
			newFakeNode(t, nc, "OTHER", nil).start() // answers "not found"

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var out, errb bytes.Buffer
			code := Main(ctx, natsArgs(s.ClientURL(), "workload", "stop", id), IO{Stdout: &out, Stderr: &errb})
			want := "node HOLDER, which holds it, answered the stop with an error: " + failure + " (code 500); whether it stopped is unknown"
			if code != ExitUnknown || !strings.Contains(errb.String(), want) {
				t.Errorf("exit %d, %q %q; want exit %d with %q", code, out.String(), errb.String(), ExitUnknown, want)
			}
		})
	}
}

// TestStopTakesOtherNodesNotFound: the node holding W1 signs (its listing was signed)
// and answers the stop only after another signing node answered "not found" and
// nexctl said (--verbose) that it took that answer and still waits for the holder.
// The other node's signed "not found" is its own answer: it ends nothing, and nothing
// is warned of. Before, it was refused as a forgery, `ignored 1 repl(ies) to the stop
// of W1: signed by node B, not by node A, which holds it`, on every stop on more than
// one node (nexctl said no such line, and the test ended with the holder held).
func TestStopTakesOtherNodesNotFound(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	gate := make(chan struct{})
	holder := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	holder.drains = true // its WPING replies name it: the holder
	holder.stopOK = true
	holder.stopGate = gate
	holder.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	holder.start()
	other := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	other.drains = true
	other.start()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errOut testkit.Buffer
	done := make(chan int, 1)
	// --nats.timeout: the wait for the holder, far past the test's release.
	go func() {
		done <- Main(ctx, opArgs(t, op, "--nats.timeout", "30s", "--verbose", "workload", "stop", "W1"), IO{Stdout: &out, Stderr: &errOut, Env: func(string) string { return "" }})
	}()
	waits := "nexctl: debug: stop of W1: node " + other.id + " answered (workload not found); still waiting up to "
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for !errOut.Contains(waits) {
		select {
		case code := <-done:
			close(gate)
			t.Fatalf("nexctl ended (exit %d) before it said it took the other node's \"not found\" and waits on\n%s%s", code, out.String(), errOut.String())
		case <-poll.C:
		}
	}
	close(gate)
	code := <-done
	t.Logf("workload stop: exit %d\n%s%s", code, out.String(), errOut.String())
	if code != 0 || !strings.Contains(out.String(), "Workload W1 successfully stopped") {
		t.Errorf("exit %d, want 0: the holder stopped it", code)
	}
	if strings.Contains(errOut.String(), "ignored") || strings.Contains(errOut.String(), "warning") {
		t.Errorf("the other node's own answer was warned of:\n%s", errOut.String())
	}
}
