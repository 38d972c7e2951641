package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// drainFrames is a two-node drain as --wait sees it at four moments: waiting for the
// delay, both nodes after it, one drained, and the other shut down.
func drainFrames(t0 time.Time) ([]*drainNode, []func() time.Time) {
	a := &drainNode{ID: "NAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Name: "alpha", Until: t0.Add(30 * time.Second), Start: 3, Left: 3}
	b := &drainNode{ID: "NBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB", Until: t0.Add(30 * time.Second), Start: 2, Left: 2}
	steps := []func() time.Time{
		func() time.Time { return t0 },
		func() time.Time { return t0.Add(10 * time.Second) }, // nothing new for plain lines
		func() time.Time { a.Left, b.Left = 1, 0; b.Done = true; return t0.Add(31 * time.Second) },
		func() time.Time { a.Left, a.Gone, a.Done, a.Killed = 0, true, true, 1; return t0.Add(35 * time.Second) },
	}
	return []*drainNode{a, b}, steps
}

// TestDrainViewGolden: lameduck --wait's plain lines, and its bars on a terminal of
// unknown width and of 60 columns (escape sequences shown as ESC).
func TestDrainViewGolden(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 11, 0, 0, 0, time.UTC)
	var out bytes.Buffer
	for _, mode := range []struct {
		name string
		tty  bool
		cols int
	}{{"plain", false, 0}, {"terminal", true, 0}, {"terminal, 60 columns", true, 60}} {
		fmt.Fprintf(&out, "== %s\n", mode.name)
		nodes, steps := drainFrames(t0)
		v := &drainView{tty: mode.tty, cols: mode.cols, last: map[string]string{}}
		for i, step := range steps {
			now := step()
			fmt.Fprintf(&out, "-- frame %d\n%s", i, strings.ReplaceAll(v.render(nodes, now), "\x1b", "ESC"))
		}
	}
	golden(t, "lameduck_wait", out.Bytes())
}

// TestLameduckWaitExitCodes: `node lameduck --tag --wait` against two nexd-like nodes
// follows each drain and exits 0 when every workload stopped on SIGTERM, 1 when one had
// to be killed, counting kills per node in --json.
func TestLameduckWaitExitCodes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		kills int
		code  int
	}{{"clean", 0, 0}, {"killed", 1, 1}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, s)
			def := "default"
			for i, id := range []string{"NDRAINA", "NDRAINB"} {
				n := newFakeNode(t, nc, id, map[string]string{"zone": "z"})
				n.drains, n.load = true, 2
				n.workloads = []protocol.WorkloadSummary{{ID: fmt.Sprintf("W%dA", i), Name: "a", Namespace: &def, WorkloadType: "native"},
					{ID: fmt.Sprintf("W%dB", i), Name: "b", Namespace: &def, WorkloadType: "native"}}
				if i == 1 {
					n.kills = tc.kills
				}
				n.start()
			}
			out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "node", "lameduck", "--tag", "zone=z", "--delay", "300ms", "--wait")...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			for _, want := range []string{"node ndraina (NDRAINA): 2 workload(s) left", "node ndraina (NDRAINA): drained",
				"node ndrainb (NDRAINB): drained"} {
				if !strings.Contains(out, want) {
					t.Errorf("no %q in\n%s", want, out)
				}
			}
			if tc.kills > 0 && !strings.Contains(errOut, "1 workload(s) ignored SIGTERM and were killed") {
				t.Errorf("kill not reported: %s", errOut)
			}
		})
	}
}

// TestLameduckWaitJSONKills: --json results say which node killed a workload.
func TestLameduckWaitJSONKills(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	def := "default"
	for i, id := range []string{"NJSONA", "NJSONB"} {
		n := newFakeNode(t, nc, id, map[string]string{"zone": "j"})
		n.drains, n.load, n.kills = true, 1, i
		n.workloads = []protocol.WorkloadSummary{{ID: "WJ" + id, Name: "a", Namespace: &def, WorkloadType: "native"}}
		n.start()
	}
	out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "--json", "node", "lameduck", "--tag", "zone=j", "--delay", "300ms", "--wait")...)
	if code != 1 {
		t.Fatalf("exit %d, want 1\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	var res []struct {
		NodeID  string `json:"node_id"`
		Drained bool   `json:"drained"`
		Killed  int    `json:"killed"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res) != 2 {
		t.Fatalf("json %v: %s", err, out)
	}
	for _, r := range res {
		want := map[string]int{"NJSONA": 0, "NJSONB": 1}[r.NodeID]
		if !r.Drained || r.Killed != want {
			t.Errorf("%+v: want drained with %d killed", r, want)
		}
	}
	var e struct {
		Error struct {
			ExitCode int    `json:"exit_code"`
			Message  string `json:"message"`
		} `json:"error"`
	}
	// The error is the last line; before it, the notes that these nodes' answers are
	// not signed (they play upstream nodes).
	lines := strings.Split(strings.TrimSpace(errOut), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &e); err != nil || e.Error.ExitCode != 1 || !strings.Contains(e.Error.Message, "killed") {
		t.Errorf("json error %v: %s", err, errOut)
	}
}

// TestLameduckWaitPartialIsNotDrained: a draining node whose nexlets' counts reach 0
// while its list is partial (a nexlet that does not answer the node: its workloads are
// not in the counts) is not reported drained. --wait says the list is partial and keeps
// waiting; when the nexlet answers again the node is drained (exit 0); when the node
// stops while its list is still partial, --wait says it is not known to be drained and
// exits 1 (--json: drained false). Before, the first count of 0 was "drained", exit 0.
func TestLameduckWaitPartialIsNotDrained(t *testing.T) {
	t.Parallel()
	named := []protocol.MissingNexlet{{ID: "AECHO", Name: "echo-a", Reason: "no answer within 2s"}}
	const namedText = "nexlet echo-a (AECHO): no answer within 2s"
	for _, tc := range []struct {
		name    string
		missing []protocol.MissingNexlet // nil: the count alone, as a tenant gets it
		end     func(n *fakeNode)
		code    int
		want    []string
	}{
		{"nexlet back", named, func(n *fakeNode) { n.setPartial(nil) }, 0, []string{"node npart (NPART): drained"}},
		{"node stops", named, (*fakeNode).vanish, 1, []string{"node npart (NPART): node stopped; not known to be drained: its last list was partial"}},
		// A partial list that counts its missing nexlets without naming them is
		// partial too (before: its empty text counted as whole, drained at once).
		{"count only", nil, func(n *fakeNode) { n.setPartial(nil) }, 0, []string{"node npart (NPART): drained"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, s)
			def := "default"
			n := newFakeNode(t, nc, "NPART", map[string]string{"zone": "p"})
			n.drains, n.load = true, 1
			n.workloads = []protocol.WorkloadSummary{{ID: "WP1", Name: "a", Namespace: &def, WorkloadType: "native"}}
			n.partial = &protocol.PartialList{NodeName: "npart", Wait: "2s", MissingCount: 1, Missing: tc.missing}
			n.start()
			ended := make(chan struct{})
			go func() { // once nexctl has had a partial list after the drain, the end
				defer close(ended)
				// Its round shows that list's "waiting" before it asks again; a fixed
				// pause (1.5 s) could end before a loaded nexctl asked at all.
				testkit.WaitFor(testkit.DefaultWait, func() bool {
					n.mu.Lock()
					defer n.mu.Unlock()
					return n.partialDrained > 0
				})
				tc.end(n)
			}()
			defer func() { <-ended }()
			out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "node", "lameduck", "NPART", "--delay", "300ms", "--wait")...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			what := namedText
			if tc.missing == nil {
				what = "1 of its nexlets (the node names them to the system namespace only)"
			}
			want := append([]string{"node npart (NPART): 0 workload(s) listed, list partial (" + what + "); waiting"}, tc.want...)
			for _, w := range want {
				if !strings.Contains(out, w) {
					t.Errorf("no %q in\n%s", w, out)
				}
			}
			if tc.code != 0 && !strings.Contains(errOut, "not known to be drained: their last list was partial") {
				t.Errorf("stderr %q does not say why", errOut)
			}
		})
	}
}

// TestDrainBarsEscapeNetworkText: on a terminal the bars' own cursor moves reach it as
// they are, while a node's name and its drain's reason (from the network) are shown
// escaped, through the sanitizer every nexctl output passes.
func TestDrainBarsEscapeNetworkText(t *testing.T) {
	var buf bytes.Buffer
	now := time.Now()
	v := newDrainView(sanitizer{&buf}, true)
	n := &drainNode{ID: "N1", Name: "evil\x1b[31m", Until: now, Start: 1, Left: 1}
	v.show([]*drainNode{n}, now)
	n.Done, n.Told, n.Outcome, n.Reason = true, true, "failed", "nexlet \x1b]0;title\x07 hung"
	v.show([]*drainNode{n}, now)
	out := buf.String()
	for _, want := range []string{"\x1b[2K", "\x1b[1A", `evil\x1b[31m`, `drain failed: nexlet \x1b]0;title\x07 hung`} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in %q", want, out)
		}
	}
	for _, raw := range []string{"\x1b[31m", "\x1b]0;", "\x07"} {
		if strings.Contains(out, raw) {
			t.Errorf("network text %q reached the terminal raw: %q", raw, out)
		}
	}
}

// TestLameduckMigrateNodeListFailed: the node to drain answers the list with an error
// (a nexd node whose list is over the server's max_payload: 413, naming itself), so its
// services cannot be known. `node lameduck --migrate` says so, naming the node and its
// error, and exits 1: they stop with the drain. Before, the error answer counted as a
// node listing nothing: nothing was migrated, nothing said, exit 0.
func TestLameduckMigrateNodeListFailed(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	const tooBig = "this node's list of 3000 workloads is 1200001 bytes, over the 1047552 one NATS message may carry (max_payload); list them on the node: nexctl workloads"
	n := newFakeNode(t, nc, "NBIG", nil)
	n.listError = tooBig
	n.start()
	out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "node", "lameduck", "NBIG", "--delay", "1m", "--migrate")...)
	want := "nexctl: migrate: node NBIG did not list its workloads: " + tooBig + " (code 413); their services are not migrated and stop with the drain"
	if code != ExitFailed || !strings.Contains(errOut, want) || !strings.Contains(errOut, "1 service(s) could not be migrated") {
		t.Errorf("exit %d, want 1 with %q\nstdout: %s\nstderr: %s", code, want, out, errOut)
	}
	// top --node shares the listing: the snapshot is marked PARTIAL with the node's
	// error (before: an empty snapshot, exit 0).
	out, errOut, code = runCLI(t, nil, natsArgs(s.ClientURL(), "top", "--node", "NBIG")...)
	if code != ExitFailed || !strings.Contains(out, "PARTIAL: node NBIG did not list its workloads: "+tooBig) {
		t.Errorf("top --node: exit %d, want 1 and PARTIAL naming the node's error\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}
