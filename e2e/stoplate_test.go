package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestStopAnsweredByALateHolder: the node holding a workload answers its stop after
// another node's "not found" (a loaded node, as in a fresh-clone CI run): its stop is
// held (NEXD_TEST_HOLD=stop-late) until the test, having seen the other node's "not
// found" on the bus and nexctl still waiting holderLate after it, releases it.
// `nexctl workload stop` and `nexctl node lameduck --migrate` wait for the holder they
// know from the listing or the clone's answer and report the stop it made. Before, both
// ended --gather-stall (25 ms) after the other node's "not found": `workload stop` said
// the workload was not stopped, and the migrate that `clone … started, but the
// original … was not stopped: workload not found`, exit 1, while the holder had
// stopped it. Before, too, the holder's stop was held a fixed 0.3 s from its arrival,
// which on a loaded machine need not have been after the other node's answer.
func TestStopAnsweredByALateHolder(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	release := t.TempDir()
	a := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.StopLate + "," + testhold.ReleaseIn(release)}})
	ida := a.waitReady(t).NodeID
	one := a.runWorkload(t, "--name", "one", "--", "/bin/sleep", "600")
	svc := a.runWorkload(t, "--name", "svc", "--", "/bin/sleep", "600")
	b := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"}})
	idb := b.waitReady(t).NodeID
	notFound := answeredNotFound(t, testnats.Connect(t, s), idb)

	out, errOut, code := stopHeldLate(t, a, release, notFound, one.ID, "workload", "stop", one.ID)
	if code != 0 || !strings.Contains(out, "Workload "+one.ID+" successfully stopped") {
		t.Fatalf("stop of a workload whose node answers late: exit %d, %q %q", code, out, errOut)
	}

	out, errOut, code = stopHeldLate(t, a, release, notFound, svc.ID, "node", "lameduck", ida, "--migrate", "--delay", "30s")
	if code != 0 || !strings.Contains(out, "Migrated svc ["+svc.ID+"]") || !strings.Contains(out, "old copy stopped: true") {
		t.Fatalf("lameduck --migrate off a node that answers its stop late: exit %d, %q %q", code, out, errOut)
	}
	if ws := a.workloads(t); len(ws) != 0 {
		t.Fatalf("the draining node still runs %+v", ws)
	}
	ws := b.workloads(t)
	if len(ws) != 1 || ws[0].Name != "svc" || ws[0].ID == svc.ID {
		t.Fatalf("node b after the migration: %+v", ws)
	}
}

// holderLate is how long after the other node's "not found" TestStopAnsweredByALateHolder
// keeps the holder's stop held: nexctl must still be waiting then. 40 times its
// --gather-stall (25 ms), after which a client that ends its wait on the first "not
// found" (the bug) has ended; a client that waits for the holder waits --nats.timeout.
const holderLate = time.Second

// answeredNotFound delivers the id of each stop that node answered "not found", as the
// bus carried it to the client that asked.
func answeredNotFound(t *testing.T, nc *nats.Conn, node string) <-chan string {
	t.Helper()
	ids := make(chan string, 16)
	sub, err := nc.Subscribe(">", func(m *nats.Msg) {
		if m.Header.Get(protocol.HeaderNode) != node {
			return
		}
		var r protocol.StopWorkloadResponse
		if json.Unmarshal(m.Data, &r) == nil && r.ID != "" && r.Message == protocol.ErrTextWorkloadNotFound {
			select {
			case ids <- r.ID:
			default:
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return ids
}

// stopHeldLate runs nexctl args on holder, which holds its stop of id (stop-late)
// until released: once another node answered "not found" (notFound) and nexctl still
// waits holderLate later. It returns nexctl's output and exit code, having checked
// that the holder's stop was held until the test released it.
func stopHeldLate(t *testing.T, holder *node, release string, notFound <-chan string, id string, args ...string) (string, string, int) {
	t.Helper()
	// A release a last stop's hold did not take (its bound passed) is not this one's.
	if err := os.Remove(filepath.Join(release, testhold.StopLate)); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	from := len(holder.out.String())
	type result struct {
		out, errOut string
		code        int
		err         error
	}
	done := make(chan result, 1)
	bin, dir := nexctlBin(t), t.TempDir()
	// --nats.timeout: the wait for the holder's word, well past the test's hold.
	full := append(append([]string{"--control-socket", holder.socket, "--nats.timeout", "60s"}, holder.natsArgs()...), args...)
	go func() {
		so, se, code, err := runIn(dir, nil, bin, full...)
		done <- result{so, se, code, err}
	}()
	failEarly := func(r result, when string) {
		t.Helper()
		t.Fatalf("nexctl %v ended %s, before the holder's answer (held): exit %d, err %v\nstdout: %s\nstderr: %s", args, when, r.code, r.err, r.out, r.errOut)
	}
	for waiting := true; waiting; {
		select {
		case got := <-notFound:
			waiting = got != id
		case r := <-done:
			failEarly(r, "before another node answered \"not found\"")
		case <-time.After(60 * time.Second):
			t.Fatalf("nexctl %v: no other node answered \"not found\" within 60s", args)
		}
	}
	select {
	case r := <-done:
		failEarly(r, "within "+holderLate.String()+" of another node's \"not found\"")
	case <-time.After(holderLate):
	}
	if err := testhold.Release(release, testhold.StopLate); err != nil {
		t.Fatal(err)
	}
	r := <-done // runIn's own bound: 60 s
	if r.err != nil {
		t.Fatal(r.err)
	}
	went := regexp.MustCompile(`msg="test hold: the stop of an owned workload goes on"[^\n]*\bworkload_id=` + id + ` hold=` + testhold.StopLate + ` released=(\w+)`)
	if m := went.FindStringSubmatch(holder.out.String()[from:]); m == nil || m[1] != "true" {
		t.Fatalf("nexctl %v: the holder's stop was not held until the test released it: %q", args, m)
	}
	return r.out, r.errOut, r.code
}
