package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// runCLI runs nexctl in-process and returns its output and exit code.
func runCLI(t *testing.T, env map[string]string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	code := Main(ctx, args, IO{Stdout: &out, Stderr: &errb, Env: func(k string) string { return env[k] }})
	return out.String(), errb.String(), code
}

// natsArgs adds the connection flags; a generous stall keeps the count of replies
// from several fake nodes exact on a loaded machine.
func natsArgs(url string, args ...string) []string {
	return append([]string{"-s", url, "--nats.timeout", "3s", "--gather-stall", "1s"}, args...)
}

func TestGatherEndsWhenRepliesStop(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	for i := range 3 {
		sub, err := nc.Subscribe("svc.x", func(m *nats.Msg) { _ = m.Respond([]byte{byte('a' + i)}) })
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
	}
	ctx := context.Background()
	f := &fleet{nc: nc}
	// A very long first-reply bound: returning well before it proves the gather ended
	// on the stall after the last reply, not on the bound.
	const bound = time.Minute
	start := time.Now()
	msgs, err := f.gather(ctx, "svc.x", nil, gatherOpts{first: bound, stall: 100 * time.Millisecond})
	if err != nil || len(msgs) != 3 {
		t.Fatalf("gather = %d msgs, %v", len(msgs), err)
	}
	if time.Since(start) >= bound/2 {
		t.Fatalf("gather waited for its bound instead of ending after the last reply")
	}
	msgs, err = f.gather(ctx, "svc.x", nil, gatherOpts{first: bound, stall: bound, max: 2})
	if err != nil || len(msgs) != 2 {
		t.Fatalf("gather max 2 = %d msgs, %v", len(msgs), err)
	}
	start = time.Now()
	msgs, err = f.gather(ctx, "svc.nobody", nil, gatherOpts{first: bound, stall: bound})
	if err != nil || len(msgs) != 0 || time.Since(start) >= bound/2 {
		t.Fatalf("gather without responders = %d msgs, %v (should end at once)", len(msgs), err)
	}
}

func TestNodeCommands(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	a := newFakeNode(t, nc, "NODEA", map[string]string{"pool": "blue"}).start()
	b := newFakeNode(t, nc, "NODEB", map[string]string{"pool": "blue"}).start()
	newFakeNode(t, nc, "NODEC", map[string]string{"pool": "green"}).start()

	out, errOut, code := runCLI(t, nil, natsArgs(url, "node", "list")...)
	if code != 0 || strings.Count(out, "NODE") != 3 || !strings.Contains(out, "Nex Nodes") {
		t.Fatalf("node list: code %d\n%s%s", code, out, errOut)
	}
	out, _, code = runCLI(t, nil, natsArgs(url, "--json", "node", "list", "--filter", "pool=green")...)
	var nodes []protocol.NodePingResponse
	if code != 0 || json.Unmarshal([]byte(out), &nodes) != nil || len(nodes) != 1 || nodes[0].NodeID != "NODEC" {
		t.Fatalf("node list --filter: code %d: %s", code, out)
	}
	out, _, code = runCLI(t, nil, natsArgs(url, "node", "list", "--filter", "pool=red")...)
	if code != 0 || out != "No nodes found\n" {
		t.Fatalf("node list no match: %d %q", code, out)
	}

	out, _, code = runCLI(t, nil, natsArgs(url, "node", "info", "NODEA", "--full")...)
	if code != 0 || !strings.Contains(out, "Information about Node NODEA") || !strings.Contains(out, "go_exec [0.0.1]") {
		t.Fatalf("node info: %d\n%s", code, out)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "node", "info", "NOPE")...)
	if code != 1 || !strings.Contains(errOut, "node NOPE not found") {
		t.Fatalf("node info unknown: %d %q", code, errOut)
	}

	// Positional id and --node-id both work.
	_, errOut, code = runCLI(t, nil, natsArgs(url, "node", "lameduck", "--node-id", "NODEA", "--delay", "2m")...)
	if code != 0 || len(a.lameducks) != 1 || a.lameducks[0].Delay != "2m0s" {
		t.Fatalf("lameduck --node-id: %d %q %+v", code, errOut, a.lameducks)
	}
	// --tag without an id drains every matching node.
	out, errOut, code = runCLI(t, nil, natsArgs(url, "node", "lameduck", "--tag", "pool=blue")...)
	if code != 0 || len(a.lameducks) != 2 || len(b.lameducks) != 1 || strings.Count(out, "successfully commanded") != 2 {
		t.Fatalf("lameduck --tag: %d\n%s%s a=%v b=%v", code, out, errOut, a.lameducks, b.lameducks)
	}
	_, _, code = runCLI(t, nil, natsArgs(url, "node", "lameduck")...)
	if code != 2 {
		t.Fatalf("lameduck without target: exit %d, want 2", code)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "node", "lameduck", "NOPE")...)
	if code != 1 || !strings.Contains(errOut, "not found") {
		t.Fatalf("lameduck unknown node: %d %q", code, errOut)
	}
	// A named node whose tags do not match stays silent; the error names the tags as
	// given (before, Go's map[pool:blue zone:a]).
	_, errOut, code = runCLI(t, nil, natsArgs(url, "--nats.timeout", "500ms", "node", "lameduck", "NODEC", "--tag", "zone=a", "--tag", "pool=blue")...)
	if code != 1 || !strings.Contains(errOut, "its tags may not match --tag pool=blue,zone=a\n") {
		t.Fatalf("lameduck named node, tags not matching: %d %q", code, errOut)
	}
}

func TestWorkloadRunPicksLeastLoadedAndFallsBack(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	busy := newFakeNode(t, nc, "BUSY", nil)
	busy.load = 7
	busy.start()
	idle := newFakeNode(t, nc, "IDLE", nil)
	idle.load = 1
	idle.failDeploy = "nexlet refused: disk full"
	idle.start()
	mid := newFakeNode(t, nc, "MID", nil)
	mid.load = 3
	mid.start()

	// Fake nodes do not sign their bids, like upstream's.
	out, errOut, code := runCLI(t, nil, natsArgs(url, "--json", "--namespace", "default", "--allow-unsigned-bids", "workload", "run", "--name", "web",
		"--env", "TOKEN=s3cret", "--tags", "nex.nexus=nexus", "--", "/bin/sh", "-c", "sleep 1")...)
	if code != 0 {
		t.Fatalf("run: exit %d\n%s%s", code, out, errOut)
	}
	var p placement
	if err := json.Unmarshal([]byte(out), &p); err != nil || p.ID != "W-MID" || p.Node != "MID" || p.Name != "web" {
		t.Fatalf("run placed %q (%v), want on MID after IDLE failed", out, err)
	}
	if len(idle.deployed()) != 1 || len(mid.deployed()) != 1 || len(busy.deployed()) != 0 {
		t.Fatalf("deploy attempts idle=%d mid=%d busy=%d, want 1,1,0", len(idle.deployed()), len(mid.deployed()), len(busy.deployed()))
	}
	if !strings.Contains(errOut, "disk full") || !strings.Contains(errOut, "trying the next bid") {
		t.Fatalf("fallback not reported: %q", errOut)
	}
	req := mid.deployed()[0]
	if req.Namespace != "default" || req.WorkloadType != "native" || req.WorkloadLifecycle != "service" || req.Tags["nex.nexus"] != "nexus" {
		t.Fatalf("deployed request %+v", req)
	}
	var rr struct {
		URI  string          `json:"uri"`
		Argv []string        `json:"argv"`
		Enc  protocol.EncEnv `json:"encrypted_environment"`
	}
	if err := json.Unmarshal([]byte(req.RunRequest), &rr); err != nil {
		t.Fatal(err)
	}
	if rr.URI != "file:///bin/sh" || strings.Join(rr.Argv, " ") != "-c sleep 1" || strings.Contains(req.RunRequest, "s3cret") {
		t.Fatalf("run request %s", req.RunRequest)
	}
	if env, err := openEnv(mid.xkey, rr.Enc); err != nil || env["TOKEN"] != "s3cret" {
		t.Fatalf("MID's nexlet cannot open its environment: %v %v", env, err)
	}

	// Plain text output, and every bid failing.
	mid.failDeploy, busy.failDeploy = "no", "nope"
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "web", "--", "/bin/true")...)
	if code != 1 || !strings.Contains(errOut, "every bid failed") {
		t.Fatalf("all failing: %d %q", code, errOut)
	}
	mid.failDeploy = ""
	out, _, code = runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "web", "--", "/bin/true")...)
	if code != 0 || out != "Workload web [W-MID] successfully started\n" {
		t.Fatalf("text output: %d %q", code, out)
	}

	// A failure that does not say "not started" may have left the workload running:
	// no other bid is tried.
	idle.unknownOutcome = true
	before := len(mid.deployed())
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "web", "--", "/bin/true")...)
	if code != 1 || !strings.Contains(errOut, "may still be starting") || len(mid.deployed()) != before {
		t.Fatalf("unknown outcome: exit %d %q, MID deploys %d -> %d", code, errOut, before, len(mid.deployed()))
	}
}

func TestWorkloadRunNoBids(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	n := newFakeNode(t, nc, "LAB", map[string]string{"region": "lab"})
	n.bid = false // no healthy native nexlet
	n.start()

	_, errOut, code := runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "x", "--tags", "region=moon", "--", "/bin/true")...)
	if code != 1 || !strings.Contains(errOut, "no node offers tag(s) region=moon") {
		t.Fatalf("missing tag: %d %q", code, errOut)
	}
	start := time.Now()
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "x", "--tags", "region=lab", "--", "/bin/true")...)
	if code != 1 || !strings.Contains(errOut, `has a healthy nexlet of type "native"`) || strings.Contains(errOut, "asking again") {
		t.Fatalf("no nexlet: %d %q", code, errOut)
	}
	// Three auctions and their waits for a first bid (--nats.timeout 3s), not the
	// deploy timeout: the node's info says it has no healthy nexlet to bid with.
	if took := time.Since(start); took > 40*time.Second {
		t.Fatalf("no nexlet: the error took %v", took)
	}
}

// TestWorkloadRunLongNamespace: a namespace longer than protocol.MaxNamespaceLen, from
// the flag or from NEX_NAMESPACE, is refused before anything is sent, naming where it
// came from and the bound (before, the auction went out and a nexd node deployed a
// workload whose credentials could not connect).
func TestWorkloadRunLongNamespace(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	n := newFakeNode(t, nc, "LAB", nil)
	n.start()
	long := strings.Repeat("n", protocol.MaxNamespaceLen+1)
	for _, c := range []struct {
		environ []string
		flags   []string
		origin  string
	}{
		{nil, []string{"--namespace", long}, "flag --namespace: "},
		{[]string{"NEX_NAMESPACE=" + long}, nil, "env NEX_NAMESPACE: "},
	} {
		args := append(append([]string{"-s", s.ClientURL()}, c.flags...), "workload", "run", "--name", "x", "--", "/bin/true")
		var errb bytes.Buffer
		code := Main(context.Background(), args, IO{Stdout: &bytes.Buffer{}, Stderr: &errb, Environ: c.environ, Env: func(string) string { return "" }})
		errOut := errb.String()
		if code != ExitUsage || !strings.Contains(errOut, c.origin+`namespace "`+long[:8]) ||
			!strings.Contains(errOut, "65 characters long, more than 64") {
			t.Fatalf("%s: exit %d %q", c.origin, code, errOut)
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.auctions != 0 || n.pings != 0 {
		t.Fatalf("nexctl sent %d auctions and %d pings", n.auctions, n.pings)
	}
}

// TestWorkloadRunAsksUntilBid: a node that has a healthy nexlet of the type but drops
// auctions (as one under an auction flood did) gets asked again, with backoff, past
// the two quick retries, and the workload is placed (before, nexctl gave up after
// three auctions: "no node has a healthy nexlet of type").
func TestWorkloadRunAsksUntilBid(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	n := newFakeNode(t, nc, "BUSY", nil)
	n.dropAuctions = 4
	n.start()
	args := append([]string{"-s", url, "--nats.timeout", "500ms", "--gather-stall", "100ms"}, "workload", "run", "--name", "x", "--", "/bin/true")
	out, errOut, code := runCLI(t, nil, args...)
	if code != 0 || !strings.Contains(out, "successfully started") || !strings.Contains(errOut, "no bid yet, though node BUSY has a healthy native nexlet") {
		t.Fatalf("exit %d, out %q, err %q", code, out, errOut)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.auctions != 5 || len(n.deploys) != 1 {
		t.Fatalf("%d auctions, %d deploys; want 5 and 1", n.auctions, len(n.deploys))
	}
}

// TestWorkloadRunFullNodeGivesUp: a node whose healthy nexlet is full withholds its
// bid without saying why (upstream's info has no max_workloads; nexd's does, e2e
// TestFullNexletNoBidSaysMaxWorkloads); nexctl asks again for at most lostBidWait, not its 5 min 30 s deploy timeout,
// and says there was no bid.
func TestWorkloadRunFullNodeGivesUp(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	n := newFakeNode(t, nc, "FULL", nil)
	n.full = true
	n.start()
	start := time.Now()
	_, errOut, code := runCLI(t, nil, "-s", s.ClientURL(), "--nats.timeout", "500ms", "--gather-stall", "100ms", "workload", "run", "--name", "x", "--", "/bin/true")
	took := time.Since(start)
	if code != 1 || !strings.Contains(errOut, "no bids for a native workload") || took > lostBidWait+15*time.Second {
		t.Fatalf("exit %d after %v: %q", code, took, errOut)
	}
}

func TestWorkloadRunInputs(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	n := newFakeNode(t, nc, "ONE", map[string]string{"a": "b"}).start()

	dir := t.TempDir()
	file := dir + "/web.yaml"
	testkit.WriteFile(t, file, "name: from-file\ntype: native\nlifecycle: job\ndescription: d\ntags: {a: b}\nstart_request:\n  uri: file:///bin/true\n  argv: [x]\n")
	// Flags override the file.
	_, errOut, code := runCLI(t, nil, natsArgs(url, "workload", "run", "-f", file, "--name", "flagname", "--lifecycle", "service")...)
	if code != 0 {
		t.Fatalf("run -f: %d %q", code, errOut)
	}
	got := n.deployed()[0]
	if got.Name != "flagname" || got.WorkloadLifecycle != "service" || got.Description != "d" || got.Tags["a"] != "b" || !strings.Contains(got.RunRequest, `"argv":["x"]`) {
		t.Fatalf("deployed %+v", got)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "j", "--start-request", `{"uri":"file:///bin/true"}`, "--plain-env", "--env", "A=1")...)
	if code != 0 || !strings.Contains(n.deployed()[1].RunRequest, `"environment":{"A":"1"}`) {
		t.Fatalf("--start-request --plain-env: %d %q %s", code, errOut, n.deployed()[1].RunRequest)
	}

	usage := [][]string{
		{"workload", "run", "--name", "x"},                                              // nothing to run
		{"workload", "run", "--name", "x", "--lifecycle", "forever", "--", "/bin/true"}, // bad lifecycle
		{"workload", "run", "--start-request", "[1]", "--name", "x"},                    // not an object
		{"workload", "run", "-f", dir + "/missing.json"},                                // missing file
		{"workload", "run", "--name", "x", "/bin/true"},                                 // command without --
	}
	for _, args := range usage {
		if _, errOut, code := runCLI(t, nil, natsArgs(url, args...)...); code != 2 {
			t.Errorf("%v: exit %d (%q), want 2", args, code, errOut)
		}
	}
	// A start request that fails the bid's schema is refused before deploying.
	before := len(n.deployed())
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "run", "--name", "x", "--start-request", `{"argv":["a"]}`)...)
	if code != 1 || !strings.Contains(errOut, "schema") || len(n.deployed()) != before {
		t.Fatalf("schema-invalid request: %d %q", code, errOut)
	}
}

func TestWorkloadListStopInfoClone(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	def := "default"
	n := newFakeNode(t, nc, "ONE", map[string]string{"new": "tag"})
	n.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z", WorkloadType: "native",
		WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	// The original's environment re-sealed for whoever asks would need the clone's key;
	// here it is plain, the common case.
	n.stored["W1"] = protocol.StartWorkloadRequest{Name: "web", Namespace: "default", Description: "d", WorkloadType: "native",
		WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/true","argv":["1"]}`, Tags: map[string]string{"old": "tag"}}
	n.stopOK = true
	n.start()

	out, _, code := runCLI(t, nil, natsArgs(url, "workload", "list")...)
	if code != 0 || !strings.Contains(out, "Running Workloads - system") || !strings.Contains(out, "│ default ") {
		t.Fatalf("list: %d\n%s", code, out)
	}
	out, errOut, code := runCLI(t, nil, natsArgs(url, "--namespace", "other", "workload", "list")...)
	if code != 0 || out != "No workloads found\n" {
		t.Fatalf("list other ns: %d %q %q", code, out, errOut)
	}

	out, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "info", "W1")...)
	if code != 0 || !strings.Contains(out, "file:///bin/true") || !strings.Contains(out, "│ Namespace   │ default") {
		t.Fatalf("info: %d\n%s%s", code, out, errOut)
	}
	// info shows a sealed environment as "(sealed)": it asks for no re-seal (before, it
	// named a throwaway key of its own, which a nexd node refused and logged and an
	// upstream node re-sealed the workload's secrets to).
	n.mu.Lock()
	clones := slices.Clone(n.clones)
	n.mu.Unlock()
	if len(clones) != 1 || clones[0].NewTargetXKey != "" || clones[0].Bid != nil {
		t.Fatalf("info's clone requests: %+v", clones)
	}

	// Stop from system: the namespace is discovered first, the undeploy goes to it.
	out, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "stop", "W1")...)
	if code != 0 || out != "Workload W1 successfully stopped\n" || n.stops[0] != protocol.UndeploySubject("default", "W1") {
		t.Fatalf("stop: %d %q %q %v", code, out, errOut, n.stops)
	}
	n.stopOK = false
	_, errOut, code = runCLI(t, nil, natsArgs(url, "--namespace", "default", "workload", "stop", "W1")...)
	if code != 1 || !strings.Contains(errOut, "was not stopped") {
		t.Fatalf("stop not stopped: %d %q", code, errOut)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "stop", "NOPE")...)
	if code != 1 || !strings.Contains(errOut, "not found") {
		t.Fatalf("stop unknown: %d %q", code, errOut)
	}

	n.stopOK = true
	out, errOut, code = runCLI(t, nil, natsArgs(url, "workload", "clone", "W1", "--tags", "new=tag", "--stop")...)
	if code != 0 || !strings.Contains(out, "Workload web [W-ONE] successfully started") || !strings.Contains(out, "Original workload [W1] stopped") {
		t.Fatalf("clone: %d\n%s%s", code, out, errOut)
	}
	cl := n.deployed()[0]
	if cl.Namespace != "default" || cl.Tags["new"] != "tag" || cl.Tags["old"] != "" || !strings.Contains(cl.RunRequest, "file:///bin/true") {
		t.Fatalf("clone deployed %+v", cl)
	}
}

// TestWorkloadListNodeErrorIsNotEmpty: a node answers the list with an error (a nexd
// node whose list is over the server's max_payload: 413, naming itself), another with
// its rows. nexctl prints the rows that came, names the node that failed with its
// error and exits 1; with no rows at all it does not say "No workloads found". Before,
// the error was a warning ("ignoring a reply") and nexctl exited 0, printing "No
// workloads found" when the failing node was the only one with workloads.
func TestWorkloadListNodeErrorIsNotEmpty(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	def := "default"
	good := newFakeNode(t, nc, "GOOD", nil)
	good.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z", WorkloadType: "native",
		WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	good.start()
	const tooBig = "this node's list of 300 workloads is 120001 bytes, over the 64444 one NATS message may carry (max_payload); list them on the node: nexctl workloads"
	big := newFakeNode(t, nc, "BIG", nil)
	big.listError = tooBig
	big.start()

	out, errOut, code := runCLI(t, nil, natsArgs(url, "workload", "list")...)
	if code != ExitFailed || !strings.Contains(out, "│ W1 ") || !strings.Contains(errOut, "node BIG did not list its workloads: "+tooBig+" (code 413)") ||
		strings.Contains(errOut, "ignoring") {
		t.Errorf("list with one node failing: exit %d, want 1, W1's row and BIG named with its error\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	// Only the failing node could hold workloads in namespace other: no "No workloads found".
	out, errOut, code = runCLI(t, nil, natsArgs(url, "--namespace", "other", "workload", "list")...)
	if code != ExitFailed || out != "" || !strings.Contains(errOut, "node BIG did not list its workloads") {
		t.Errorf("list where only the failing node answers: exit %d, want 1, nothing on stdout and BIG named\nstdout: %q\nstderr: %s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, natsArgs(url, "--json", "--namespace", "other", "workload", "list")...)
	var je jsonError
	if code != ExitFailed || strings.TrimSpace(out) != "[]" || json.Unmarshal([]byte(errOut), &je) != nil || je.Error.ExitCode != ExitFailed ||
		!strings.Contains(je.Error.Message, "node BIG") {
		t.Errorf("--json list: exit %d, want 1, [] and a JSON error naming BIG\nstdout: %q\nstderr: %s", code, out, errOut)
	}

	// A lookup that finds nothing says the failing node may hold it (before: plain
	// "not found").
	for _, args := range [][]string{{"workload", "stop", "big-one"}, {"workload", "info", "big-one"}} {
		_, errOut, code = runCLI(t, nil, natsArgs(url, args...)...)
		if code != ExitFailed || !strings.Contains(errOut, "workload big-one not found in namespace system") ||
			!strings.Contains(errOut, "; but it may be on a node that did not list its workloads: node BIG did not list its workloads: "+tooBig) {
			t.Errorf("%v: exit %d, want 1, not found naming BIG\nstderr: %s", args, code, errOut)
		}
	}

	// A node that does not name itself (an upstream node) is said to be one.
	anon := newFakeNode(t, nc, "ANON", nil)
	anon.listError, anon.listErrorUnnamed = "internal error", true
	anon.start()
	_, errOut, code = runCLI(t, nil, natsArgs(url, "--namespace", "other", "workload", "list")...)
	if code != ExitFailed || !strings.Contains(errOut, "2 nodes did not list their workloads") || !strings.Contains(errOut, "\n  node BIG did not") ||
		!strings.Contains(errOut, "\n  a node that does not name itself (not a nexd node) did not list its workloads: internal error (code 413)") {
		t.Errorf("list with two nodes failing: exit %d, want 1 naming both\nstderr: %s", code, errOut)
	}
}

func TestWorkloadCloneResealsEnvironment(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	n := newFakeNode(t, nc, "ONE", nil).start()
	// A node that re-seals the environment for the clone request's new_target_xkey when
	// a bid names it, and otherwise returns it sealed for its original nexlet.
	orig, _ := nkeys.CreateCurveKeys()
	origPub, _ := orig.PublicKey()
	sub, err := nc.Subscribe("$NEX.SVC.*.control.CLONE.W9", func(m *nats.Msg) {
		var req protocol.CloneWorkloadRequest
		_ = json.Unmarshal(m.Data, &req)
		target := origPub
		if req.NewTargetXKey != "" {
			if req.Bid == nil || req.Bid.XKey != req.NewTargetXKey {
				t.Errorf("re-seal asked for %s without the bid that names it: %+v", req.NewTargetXKey, req.Bid)
			}
			target = req.NewTargetXKey
		}
		enc, err := sealEnv(map[string]string{"K": "v"}, target)
		if err != nil {
			t.Error(err)
			return
		}
		rr, _ := json.Marshal(map[string]any{"uri": "file:///bin/true", "encrypted_environment": enc})
		n.respond(m, protocol.StartWorkloadRequest{Name: "sec", Namespace: "default", WorkloadType: "native", WorkloadLifecycle: "service", RunRequest: string(rr), Tags: map[string]string{}})
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	// nexctl asks on its own connection: the server must have the subscription first.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := runCLI(t, nil, natsArgs(url, "--allow-unsigned-bids", "workload", "clone", "W9")...)
	if code != 0 {
		t.Fatalf("clone: %d %q", code, errOut)
	}
	var rr struct {
		Enc protocol.EncEnv `json:"encrypted_environment"`
	}
	_ = json.Unmarshal([]byte(n.deployed()[0].RunRequest), &rr)
	if env, err := openEnv(n.xkey, rr.Enc); err != nil || env["K"] != "v" {
		t.Fatalf("the new nexlet cannot open the re-sealed environment: %v %v", env, err)
	}
}

func TestWorkloadLogs(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Publish until the test ends: the feed is live, so the subscriber sees what comes
	// after it subscribed.
	go func() {
		tk := time.NewTicker(20 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				_ = nc.Publish(protocol.LogSubject("default", "W1", "stdout"), []byte("hello out"))
				_ = nc.Publish(protocol.LogSubject("default", "W1", "stderr"), []byte("hello err\n"))
			}
		}
	}()
	out, errOut, code := runCLI(t, nil, natsArgs(url, "--namespace", "default", "workload", "logs", "W1", "--wait", "500ms")...)
	if code != 0 || !strings.Contains(out, "hello out\n") || !strings.Contains(errOut, "hello err\n") {
		t.Fatalf("logs: %d %q %q", code, out, errOut)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "--namespace", "default", "workload", "logs", "QUIET", "--wait", "200ms")...)
	if code != 0 || !strings.Contains(errOut, "-f to follow") {
		t.Fatalf("quiet logs: %d %q", code, errOut)
	}
}

func TestNodeStateAndPrune(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	url := s.ClientURL()
	ctx := context.Background()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	w1 := testnats.Record{Key: "native_W1", Value: []byte(`{"request":{}}`)}
	alive, _ := testnats.NewStateBucket(t, nc, w1)
	gone, _ := testnats.NewStateBucket(t, nc, w1)
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "nex-not-a-node"}); err != nil {
		t.Fatal(err)
	}
	newFakeNode(t, nc, alive, nil).start()

	out, errOut, code := runCLI(t, nil, natsArgs(url, "node", "state", alive)...)
	if code != 0 || !strings.Contains(out, "native_W1") {
		t.Fatalf("state: %d\n%s%s", code, out, errOut)
	}
	out, _, code = runCLI(t, nil, natsArgs(url, "node", "state", "prune", "--dry-run")...)
	if code != 0 || out != "Would remove nex-"+gone+"\n" {
		t.Fatalf("prune --dry-run: %d %q", code, out)
	}
	out, _, code = runCLI(t, nil, natsArgs(url, "--json", "node", "state", "prune")...)
	if code != 0 || !strings.Contains(out, gone) {
		t.Fatalf("prune: %d %q", code, out)
	}
	var names []string
	l := js.KeyValueStoreNames(ctx)
	for n := range l.Name() {
		names = append(names, n)
	}
	got := strings.Join(names, ",")
	if strings.Contains(got, gone) || !strings.Contains(got, alive) || !strings.Contains(got, "nex-not-a-node") {
		t.Fatalf("buckets after prune: %s", got)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(url, "node", "state", gone)...)
	if code != 1 || !strings.Contains(errOut, "no state bucket") {
		t.Fatalf("state of pruned node: %d %q", code, errOut)
	}
}

// TestWorkloadRunShowsDeployProgress: a node's progress reports during a deploy (an
// artifact download) are shown on stderr, as lines off a terminal and as JSON under
// --json, and do not count as its answer.
func TestWorkloadRunShowsDeployProgress(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	n := newFakeNode(t, nc, "SLOW", nil)
	const dl = "downloading nats://bins/web_latest"
	n.progress = []protocol.Progress{{Text: dl, Total: 40 << 20}, {Text: dl, Done: 4 << 20, Total: 40 << 20},
		{Text: dl, Done: 40 << 20, Total: 40 << 20}, {Text: "starting"}}
	n.start()
	out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "--namespace", "default", "--allow-unsigned-bids", "workload", "run",
		"--name", "web", "--", "/bin/sh", "-c", "sleep 1")...)
	if code != 0 || !strings.Contains(out, "Workload web [W-SLOW] successfully started") {
		t.Fatalf("run: exit %d\n%s\n%s", code, out, errOut)
	}
	want := "nexctl: deploying: " + dl + ": 0 of 41943040 bytes (0%)\n" +
		"nexctl: deploying: " + dl + ": 4194304 of 41943040 bytes (10%)\n" +
		"nexctl: deploying: " + dl + ": 41943040 of 41943040 bytes (100%)\n" +
		"nexctl: deploying: starting\n"
	if !strings.Contains(errOut, want) {
		t.Errorf("progress not shown as\n%s\ngot:\n%s", want, errOut)
	}
	_, errOut, code = runCLI(t, nil, natsArgs(s.ClientURL(), "--json", "--namespace", "default", "--allow-unsigned-bids", "workload", "run",
		"--name", "web", "--", "/bin/sh", "-c", "sleep 1")...)
	if code != 0 || !strings.Contains(errOut, `{"bytes_done":4194304,"bytes_total":41943040,"progress":"`+dl+`"}`) ||
		!strings.Contains(errOut, `{"progress":"starting"}`) {
		t.Errorf("--json progress: exit %d\n%s", code, errOut)
	}
}

// TestDeployProgressLine: how a progress report reads, with a bar on a terminal.
func TestDeployProgressLine(t *testing.T) {
	const dl = "downloading nats://bins/web_latest"
	var b bytes.Buffer
	for _, p := range []protocol.Progress{{Text: "starting"}, {Text: dl, Total: 5 << 20},
		{Text: dl, Done: 1 << 20, Total: 5 << 20}, {Text: dl, Done: 5<<20 - 1, Total: 5 << 20},
		{Text: dl, Done: 5 << 20, Total: 5 << 20}, {Text: dl, Done: 1536}, {Text: dl, Done: 3 << 30, Total: 4 << 30}} {
		fmt.Fprintf(&b, "%s\n%s\n", progressLine(p, false, 0), progressLine(p, true, 0))
	}
	// On a 60-column terminal the text gives way, not the bar.
	for _, p := range []protocol.Progress{{Text: "starting"}, {Text: dl, Done: 1 << 20, Total: 5 << 20}} {
		fmt.Fprintf(&b, "%s|\n", progressLine(p, true, 60))
	}
	golden(t, "deploy_progress", b.Bytes())
}

// A partial answer to a tenant names no nexlets (the node tells their count only):
// the warning says how many, and that system hears which.
func TestPartialWarningWithoutNames(t *testing.T) {
	p := &partialList{node: "NODE1", PartialList: protocol.PartialList{NodeName: "lab", Wait: "2s", MissingCount: 2}}
	want := "node lab (NODE1) listed only part of its workloads; missing those of 2 of its nexlets (the node names them to the system namespace only)"
	if got := p.Error(); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

// cliResult is what an in-process nexctl run printed and its exit code.
type cliResult struct {
	out, errOut string
	code        int
}

// runRevocable runs nexctl with args in the background as a new user of op's account,
// and returns its result to come, a revoke that cuts that user off, and the user's
// public key.
func runRevocable(t *testing.T, op *testnats.Operator, args ...string) (<-chan cliResult, func(), string) {
	t.Helper()
	tok, seed := op.User(t, "nexctl", nil)
	uc, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan cliResult, 1)
	go func() {
		out, errOut, code := runCLI(t, nil, natsArgs(op.Server.ClientURL(), append([]string{"--nats.jwt", tok, "--nats.seed", seed}, args...)...)...)
		done <- cliResult{out, errOut, code}
	}()
	return done, func() { op.Revoke(t, uc.Subject) }, uc.Subject
}

// TestWorkloadRunConnectionClosed: nexctl's own NATS connection closes under a deploy
// (its user revoked once the node has the request: the server drops it and refuses it
// when it reconnects). nexctl says so at once, outcome unknown (exit 3): the node may
// have started the workload. Before, it said the deploy timed out after its whole
// deploy bound, at once.
func TestWorkloadRunConnectionClosed(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	n := newFakeNode(t, op.Connect(t, "node"), "HELD", nil)
	held := make(chan struct{}, 1)
	n.heldDeploy = held
	n.start()
	done, revoke, _ := runRevocable(t, op, "--namespace", "default", "--allow-unsigned-bids", "workload", "run", "--name", "web", "--", "/bin/sh", "-c", "sleep 1")
	select {
	case <-held:
	case r := <-done:
		t.Fatalf("nexctl ended before its deploy reached the node: exit %d\n%s\n%s", r.code, r.out, r.errOut)
	}
	revoked := time.Now()
	revoke()
	r := <-done
	t.Logf("exit %d %v after the revocation: %s", r.code, time.Since(revoked).Round(time.Millisecond), strings.TrimSpace(r.errOut))
	if r.code != ExitUnknown || strings.Contains(r.errOut, "timed out") ||
		!strings.Contains(r.errOut, "nexctl's NATS connection closed") || !strings.Contains(r.errOut, "may have started there") {
		t.Errorf("deploy whose nexctl connection closed: exit %d\n%s\n%s\nwant exit %d saying nexctl's connection closed", r.code, r.out, r.errOut, ExitUnknown)
	}
}

// TestWorkloadStopConnectionClosed: nexctl's own NATS connection closes while it waits
// for a stop's answer (the node said "stopping"; its user then revoked). nexctl says so,
// outcome unknown (exit 3). Before, it said the workload was not stopped because the
// node did not answer within its stop bound, at once.
func TestWorkloadStopConnectionClosed(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	n := newFakeNode(t, op.Connect(t, "node"), "NAAA1", nil)
	n.stopOK, n.stopWord, n.wordOnly = true, nats.Header{}, true
	n.start()
	done, revoke, _ := runRevocable(t, op, "workload", "stop", "aDqYSZ2aIvLTDISr3fAsgI")
	testkit.Eventually(t, "the stop reaching the node", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return len(n.stops) > 0
	})
	revoke()
	r := <-done
	t.Logf("exit %d: %s", r.code, strings.TrimSpace(r.errOut))
	if r.code != ExitUnknown || strings.Contains(r.errOut, "did not answer") ||
		!strings.Contains(r.errOut, "nexctl's NATS connection closed") || !strings.Contains(r.errOut, "whether it stopped is unknown") {
		t.Errorf("stop whose nexctl connection closed: exit %d\n%s\n%s\nwant exit %d saying nexctl's connection closed", r.code, r.out, r.errOut, ExitUnknown)
	}
}

// heldWriter holds its first Write until release is closed, as a paused pager holds
// nexctl's output, and counts the lines written other than "first".
type heldWriter struct {
	entered, release chan struct{}
	once             sync.Once
	mu               sync.Mutex
	lines            int
}

func (w *heldWriter) Write(p []byte) (int, error) {
	w.once.Do(func() {
		close(w.entered)
		<-w.release
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lines += bytes.Count(p, []byte("\n")) - bytes.Count(p, []byte("first\n"))
	return len(p), nil
}

func (w *heldWriter) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lines
}

// TestLogsFollowBurst: `workload logs -f` whose output is held up (a paused pager)
// while 70,000 lines come in prints every one of them once it goes on, and follows
// on. Before, the lines waited in a sync subscription's 64Ki-slot channel (512 KB
// allocated per stream); past it, the read said 'slow consumer', which nexctl took for
// the end: it exited 0 having printed one line.
func TestLogsFollowBurst(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	w := &heldWriter{entered: make(chan struct{}), release: make(chan struct{})}
	var errb testkit.Buffer
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	exited := make(chan int, 1)
	go func() {
		exited <- Main(ctx, natsArgs(s.ClientURL(), "--namespace", "default", "workload", "logs", "W1", "-f"),
			IO{Stdout: w, Stderr: &errb, Env: func(string) string { return "" }})
	}()
	subject := protocol.LogSubject("default", "W1", "stdout")
	// "first" until nexctl printed one: its subscription is in place.
	for held := false; !held; {
		if err := nc.Publish(subject, []byte("first")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.entered:
			held = true
		case code := <-exited:
			t.Fatalf("nexctl exited %d before printing a line: %s", code, errb.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	const burst = 70_000
	for i := range burst {
		if err := nc.Publish(subject, []byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	// The server's PONG comes once it took in the whole burst: Flush's own 10 s ran
	// out with -race -cpu 1 beside other test binaries ("nats: timeout"); a minute
	// bounds a hang, not the machine's pace.
	if err := nc.FlushTimeout(time.Minute); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the burst reaches nexctl while its output is held
	close(w.release)
	const want = burst
	ok := testkit.WaitFor(time.Minute, func() bool {
		select {
		case code := <-exited:
			exited <- code
			return true
		default:
		}
		return w.count() >= want
	})
	got := w.count()
	t.Logf("%d lines sent in the burst, %d printed", want, got)
	select {
	case code := <-exited:
		t.Fatalf("nexctl logs -f exited %d after printing %d of %d lines: %s", code, got, want, errb.String())
	default:
	}
	if !ok || got != want {
		t.Fatalf("%d of %d lines printed", got, want)
	}
	// It follows on.
	if err := nc.Publish(subject, []byte("later")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the line after the burst printed", func() bool { return w.count() == want+1 })
	cancel()
	if code := <-exited; code != 0 {
		t.Errorf("nexctl logs -f interrupted: exit %d: %s", code, errb.String())
	}
}

// TestGatherConnectionClosedReported: nexctl's own NATS connection closes under a list
// (its user revoked while one node answered and another still works on its answer).
// nexctl prints what came and says the list may lack the rest, outcome unknown (exit 3):
// before, the gather ended quietly with what came, and a partial list printed with
// exit 0 read as "nothing more found".
func TestGatherConnectionClosedReported(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name    string
		subject string
		args    []string
		want    string // what the node that answered shows
	}{
		{"node list", protocol.PingSubject(), []string{"node", "list"}, "ANSWERED"},
		{"workload list", protocol.WPingSubject("default"), []string{"--namespace", "default", "workload", "list"}, "W1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			op := testnats.StartOperator(t, nil)
			n := newFakeNode(t, op.Connect(t, "node"), "ANSWERED", nil)
			ns := "default"
			n.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &ns, WorkloadType: "native", WorkloadState: "running"}}
			n.start()
			// A node still working on its answer: it has the request and never answers.
			held := make(chan struct{}, 1)
			slow := op.Connect(t, "slow")
			if _, err := slow.Subscribe(c.subject, func(*nats.Msg) {
				select {
				case held <- struct{}{}:
				default:
				}
			}); err != nil {
				t.Fatal(err)
			}
			if err := slow.Flush(); err != nil {
				t.Fatal(err)
			}
			// A long stall: only the close ends the gather.
			done, revoke, user := runRevocable(t, op, append([]string{"--gather-stall", "1m"}, c.args...)...)
			select {
			case <-held:
			case r := <-done:
				t.Fatalf("nexctl ended before its request reached the slow node: exit %d\n%s\n%s", r.code, r.out, r.errOut)
			}
			// The answer that came reached nexctl before its connection closes.
			testkit.Eventually(t, "the server sent nexctl the answer", func() bool {
				cz, err := op.Server.Connz(&server.ConnzOptions{Username: true})
				if err != nil {
					return false
				}
				for _, ci := range cz.Conns {
					if ci.AuthorizedUser == user && ci.OutMsgs > 0 {
						return true
					}
				}
				return false
			})
			time.Sleep(300 * time.Millisecond) // for nexctl to read it off loopback (late, only the stdout check below fails)
			revoke()
			r := <-done
			t.Logf("exit %d: %s", r.code, strings.TrimSpace(r.errOut))
			if r.code != ExitUnknown || !strings.Contains(r.errOut, "nexctl's NATS connection closed while it waited for the answers to "+c.subject) ||
				!strings.Contains(r.errOut, "others may not have") {
				t.Errorf("list whose nexctl connection closed: exit %d\n%s\n%s\nwant exit %d saying nexctl's connection closed", r.code, r.out, r.errOut, ExitUnknown)
			}
			if !strings.Contains(r.out, c.want) {
				t.Errorf("what came is not shown:\n%s", r.out)
			}
		})
	}
}

// TestWorkloadRunAsksAgainWhenNothingKnown: no bid yet from a node whose nexlets
// nexctl cannot learn of (its INFO refused, as a tenant's is) or whose nexlet has not
// sent its first heartbeat (health unknown, a nexlet just restarted): nexctl asks again
// until the bid comes, where it gave up after three auctions before (CI saw a
// tenant's first deploy fail so, e2e TestAttackControlCharactersInNames).
func TestWorkloadRunAsksAgainWhenNothingKnown(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		refused bool
		health  string
		warn    string
	}{
		{"info refused", true, "", "no node could be asked about its nexlets"},
		{"health unknown", false, protocol.HealthUnknown, "no bid yet, though node SLOW has a healthy native nexlet"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, s)
			n := newFakeNode(t, nc, "SLOW", nil)
			n.dropAuctions, n.infoRefused, n.infoHealth = 4, tc.refused, tc.health
			n.start()
			out, errOut, code := runCLI(t, nil, "-s", s.ClientURL(), "--nats.timeout", "500ms", "--gather-stall", "100ms", "workload", "run", "--name", "x", "--", "/bin/true")
			if code != 0 || !strings.Contains(out, "successfully started") || !strings.Contains(errOut, tc.warn) {
				t.Fatalf("exit %d, out %q, err %q", code, out, errOut)
			}
			n.mu.Lock()
			defer n.mu.Unlock()
			if n.auctions != 5 || len(n.deploys) != 1 {
				t.Fatalf("%d auctions, %d deploys; want 5 and 1", n.auctions, len(n.deploys))
			}
		})
	}
}

// TestWPingAnswerEndsItsPromise: a nexd node acknowledges a WPING at once (a promise of
// its answer, which nexctl waits up to listWait for); its signed answer, or its signed
// error, ends the promise, so a list ends once every node that promised answered. An
// answer that does not check (unsigned, in the name of that node) ends nothing. Before,
// no answer ended its promise (its key was ""), and every list on nexd nodes waited
// out listWait, 5 s, after the acknowledgements.
func TestWPingAnswerEndsItsPromise(t *testing.T) {
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := kp.PublicKey()
	f := &fleet{first: time.Second, stall: time.Millisecond}
	subject := protocol.WPingSubject(protocol.SystemNamespace)
	o, nonce, done := f.wpingOpts(subject, "")
	signed := func(h nats.Header, data []byte) *nats.Msg {
		if err := protocol.SignAnswer(kp, id, nonce, subject, h, data); err != nil {
			t.Fatal(err)
		}
		return &nats.Msg{Header: h, Data: data}
	}
	cases := []struct {
		name    string
		m       *nats.Msg
		key     string
		promise bool
	}{
		{"its acknowledgement", signed(nats.Header{protocol.HeaderProgress: {"1"}}, nil), id, true},
		{"its answer", signed(nats.Header{}, []byte("[]")), id, false},
		{"its error", signed(nats.Header{protocol.HeaderErrorCode: {"413"}, protocol.HeaderError: {"too large"}}, nil), id, false},
		{"an unsigned answer in its name", &nats.Msg{Header: nats.Header{protocol.HeaderNode: {id}}, Data: []byte("[]")}, "", false},
	}
	for _, c := range cases {
		if key, promise := o.Promise(c.m); key != c.key || promise != c.promise {
			t.Errorf("%s: key %q, promise %v; want %q, %v", c.name, key, promise, c.key, c.promise)
		}
	}
	// The answers' checks are kept for checkAnswers, which takes them as its own
	// (each check hashes the whole answer; before, every answer was verified twice);
	// the acknowledgement, which the gather does not return, is not kept.
	if _, ok := done[cases[0].m]; ok {
		t.Error("the acknowledgement's check is kept, though the gather does not return it")
	}
	answers := []*nats.Msg{cases[1].m, cases[2].m, cases[3].m}
	for _, m := range answers {
		if _, ok := done[m]; !ok {
			t.Errorf("the check of answer %q (header %v) is not kept", m.Data, m.Header)
		}
	}
	from, errs := f.checkAnswers(answers, subject, nonce, done)
	wantFrom, wantErrs := f.checkAnswers(answers, subject, nonce, nil)
	for i := range answers {
		if from[i] != wantFrom[i] || fmt.Sprint(errs[i]) != fmt.Sprint(wantErrs[i]) {
			t.Errorf("answer %d: with the promises' checks %+v, %v; verified again %+v, %v", i, from[i], errs[i], wantFrom[i], wantErrs[i])
		}
	}
	if errs[0] != nil || errs[1] != nil || errs[2] == nil {
		t.Errorf("the node's answer and error taken, the unsigned one in its name refused: got %v", errs)
	}
}
