package cli

import (
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// Attacks on the answers nexctl checked last: INFO, PTAGS and a lame duck's first
// answer (a rogue with a node's grants answers them in an honest node's name), and
// replays of a node's genuine signed answer within one request (a bus reader).

// forgedInNameOf are three replies to m posing as node id: unsigned in its name, signed
// by the rogue's own key rogueKP, and claiming id with a signature that does not verify.
func forgedInNameOf(t *testing.T, m *nats.Msg, id string, rogueKP nkeys.KeyPair, v any) []*nats.Msg {
	t.Helper()
	rogueID, _ := rogueKP.PublicKey()
	unsigned := jsonMsg(t, v, nats.Header{protocol.HeaderNode: {id}})
	own := jsonMsg(t, v, nats.Header{})
	if err := protocol.SignAnswer(rogueKP, rogueID, m.Header.Get(protocol.HeaderNonce), m.Subject, own.Header, own.Data); err != nil {
		t.Errorf("rogue: %v", err)
	}
	bad := jsonMsg(t, v, nats.Header{})
	if err := protocol.SignAnswer(rogueKP, id, m.Header.Get(protocol.HeaderNonce), m.Subject, bad.Header, bad.Data); err != nil {
		t.Errorf("rogue: %v", err)
	}
	return []*nats.Msg{unsigned, own, bad}
}

// rogueAnswersAll is rogueAnswers sending each of answers(m) in turn.
func rogueAnswersAll(t *testing.T, op *testnats.Operator, subject string, answers func(m *nats.Msg) []*nats.Msg) {
	t.Helper()
	rogueAnswers(t, op, subject, func(m *nats.Msg) *nats.Msg {
		rs := answers(m)
		for _, r := range rs[1:] {
			_ = m.RespondMsg(r)
		}
		return rs[0]
	})
}

// TestAttackRogueNodeInfo: the rogue answers INFO for the honest node at once, three
// ways (unsigned in its name, signed with a key of its own, a signature that does not
// verify), with version 6.6.6 and no nexlets, then with the server's "no responders"
// status; the honest node answers a second later. Before, `node info` showed the rogue's
// first answer. Now each forged answer is refused with a warning and the node's own is
// shown: by an id prefix (the node's signed ping row makes it a known signer), by its
// whole id (nothing known of it: its signed answer is taken over the unsigned ones that
// came within the stall before it), and under --trusted-node.
func TestAttackRogueNodeInfo(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	honest.controlDelay = time.Second
	honest.start()
	rogueKP, _ := nkeys.CreateServer()
	rogueAnswersAll(t, op, protocol.InfoSubject("*"), func(m *nats.Msg) []*nats.Msg {
		forged := forgedInNameOf(t, m, honest.id, rogueKP, protocol.NodeInfoResponse{NodeID: honest.id, Version: "6.6.6", Uptime: "1s",
			Tags: map[string]string{protocol.TagNode: "forged"}, NodeAgentSummaries: []protocol.NodeAgentSummary{}})
		return append(forged, &nats.Msg{Header: nats.Header{"Status": {"503"}}})
	})
	for _, c := range []struct {
		name string
		args []string
	}{
		{"id prefix", []string{"--json", "node", "info", honest.id[:12]}},
		{"whole id", []string{"--json", "--gather-stall", "5s", "node", "info", honest.id}},
		{"trusted", []string{"--json", "--trusted-node", honest.id, "node", "info", honest.id}},
	} {
		out, errOut, code := runCLI(t, nil, opArgs(t, op, c.args...)...)
		t.Logf("%s: node info: exit %d\n%s%s", c.name, code, out, errOut)
		var info protocol.NodeInfoResponse
		if err := json.Unmarshal([]byte(out), &info); err != nil {
			t.Errorf("%s: node info --json: %v", c.name, err)
			continue
		}
		if code != 0 || info.Version != "0.0.1" || len(info.NodeAgentSummaries) != 1 {
			t.Errorf("%s: exit %d, version %q, %d nexlets: want the honest node's own info (0.0.1, one nexlet)", c.name, code, info.Version, len(info.NodeAgentSummaries))
		}
		// Warned of once they came before the node's answer (nearly always: that comes
		// a second later).
		t.Logf("%s: forged answers warned of: %v", c.name, strings.Contains(errOut, "ignored 4 repl(ies) to node "+honest.id+"'s info"))
	}
}

// TestAttackRogueLameduckAnswer: the rogue answers the honest node's LAMEDUCK at once,
// unsigned in its name (then signed with its own key, then with a bad signature), that
// it failed to enter lame duck mode; the node enters it and answers a second later. Before,
// nexctl reported the failure (exit 1; with --wait it did not follow the drain) while
// the node drained. Now the forged answers are refused with a warning: the node's own
// is taken, and --wait follows its drain to the end (exit 0).
func TestAttackRogueLameduckAnswer(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	honest := newSigningFakeNode(t, op.Connect(t, "node"), nil)
	honest.controlDelay = time.Second
	honest.drains = true
	honest.load = 1
	honest.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	honest.start()
	rogueKP, _ := nkeys.CreateServer()
	rogueAnswersAll(t, op, protocol.LameduckSubject("*"), func(m *nats.Msg) []*nats.Msg {
		return forgedInNameOf(t, m, honest.id, rogueKP, protocol.LameduckResponse{Success: false, Message: "forged: node busy"})
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "node", "lameduck", honest.id[:12], "--delay", "1s", "--wait")...)
	t.Logf("node lameduck --wait: exit %d\n%s%s", code, out, errOut)
	if code != 0 || !strings.Contains(out, "successfully commanded") || strings.Contains(errOut, "forged: node busy") {
		t.Errorf("exit %d: want the node's own answer taken and its drain followed to the end", code)
	}
	t.Logf("forged answers warned of: %v", strings.Contains(errOut, "ignored 3 repl(ies) to the lame duck of node "+honest.id))

	// By its whole id, nothing known of it: its signed answer wins over the unsigned
	// one that came within the stall before it.
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--gather-stall", "5s", "node", "lameduck", honest.id, "--delay", "1m")...)
	t.Logf("node lameduck by id: exit %d\n%s%s", code, out, errOut)
	if code != 0 || !strings.Contains(out, "successfully commanded") || strings.Contains(errOut, "forged: node busy") {
		t.Errorf("exit %d: want the node's own answer taken", code)
	}
}

// TestAttackRoguePlacementTags: a deploy finds no bid (the honest node has no healthy
// nexlet) and asks the nodes' tags to say why; the rogue answers PTAGS in the honest
// node's name, unsigned, with the tag the deploy asked for. Before, nexctl counted two
// nodes and blamed the nexlets ("no node has a healthy nexlet"), the tag found. Now the
// forged answer is refused (the node signed its ping row) and the diagnosis is the
// node's own: no node offers the tag, one node answered.
func TestAttackRoguePlacementTags(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	honest := newSigningFakeNode(t, op.Connect(t, "node"), map[string]string{"region": "lab"})
	honest.bid = false
	honest.start()
	rogueKP, _ := nkeys.CreateServer()
	rogueAnswersAll(t, op, protocol.PTagsSubject(), func(m *nats.Msg) []*nats.Msg {
		forged := forgedInNameOf(t, m, honest.id, rogueKP, map[string]string{"region": "moon", protocol.TagNode: "honest"})
		return []*nats.Msg{forged[0], forged[2]} // its own key's tags are a node of its own
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--namespace", "default", "workload", "run", "--name", "x", "--tags", "region=moon", "--", "/bin/true")...)
	t.Logf("workload run: exit %d\n%s%s", code, out, errOut)
	if code != 1 || !strings.Contains(errOut, "no node offers tag(s) region=moon (1 node(s) answered)") {
		t.Errorf("exit %d: want the diagnosis of the node's own tags", code)
	}
	if !strings.Contains(errOut, "which signs its answers") || !strings.Contains(errOut, "does not verify") {
		t.Errorf("no warning of the forged answers:\n%s", errOut)
	}
}

// busReader connects a user that may subscribe and publish on _INBOX.>, as anyone on an
// open bus may (its own messages not echoed to it).
func busReader(t *testing.T, op *testnats.Operator) *nats.Conn {
	t.Helper()
	tok, seed := op.UserWith(t, "bus reader", nil, jwt.Permissions{
		Sub: jwt.Permission{Allow: jwt.StringList{"_INBOX.>"}},
		Pub: jwt.Permission{Allow: jwt.StringList{"_INBOX.>"}},
	})
	return testnats.Connect(t, op.Server, nats.UserJWTAndSeed(tok, seed), nats.Name("bus reader"), nats.NoEcho())
}

// replaySignedAnswers connects a bus reader (subscribe and publish on _INBOX.>, as
// anyone on an open bus may) that sends each signed answer it reads (Nex-Sig) once
// more, as it is, to the inbox it went to: a copy of a node's genuine answer for the
// same nonce. It returns the count of copies sent.
func replaySignedAnswers(t *testing.T, op *testnats.Operator) *atomic.Int64 {
	t.Helper()
	nc := busReader(t, op)
	var sent atomic.Int64
	if _, err := nc.Subscribe("_INBOX.>", func(m *nats.Msg) {
		if m.Header.Get(protocol.HeaderSig) == "" {
			return
		}
		if nc.PublishMsg(&nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}) == nil {
			sent.Add(1)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return &sent
}

// TestAttackReplayedSignedAnswers: a bus reader sends each of the honest node's signed
// answers again to nexctl's inbox. Before, `node list` listed the node twice and
// `workload list` its workload twice, and the tags diagnosis counted two nodes. Now
// each signed answer is taken once and the copies are warned of.
func TestAttackReplayedSignedAnswers(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	honest := newSigningFakeNode(t, op.Connect(t, "node"), map[string]string{"region": "lab"})
	honest.bid = false
	honest.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	honest.start()
	replayed := replaySignedAnswers(t, op)

	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--json", "node", "list")...)
	t.Logf("node list: exit %d\n%s%s", code, out, errOut)
	var rows []protocol.NodePingResponse
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("node list --json: %v\n%s", err, out)
	}
	if len(rows) != 1 || code != 0 {
		t.Errorf("exit %d, %d rows: want the honest node listed once", code, len(rows))
	}
	if !strings.Contains(errOut, "a copy of node "+honest.id+"'s signed answer") {
		t.Errorf("no warning of the replayed answer:\n%s", errOut)
	}

	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--json", "workload", "list")...)
	t.Logf("workload list: exit %d\n%s%s", code, out, errOut)
	var ws []protocol.WorkloadSummary
	if err := json.Unmarshal([]byte(out), &ws); err != nil {
		t.Fatalf("workload list --json: %v\n%s", err, out)
	}
	if len(ws) != 1 || code != 0 {
		t.Errorf("exit %d, %d rows: want W1 listed once", code, len(ws))
	}

	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--namespace", "default", "workload", "run", "--name", "x", "--tags", "region=moon", "--", "/bin/true")...)
	t.Logf("workload run: exit %d\n%s%s", code, out, errOut)
	if code != 1 || !strings.Contains(errOut, "no node offers tag(s) region=moon (1 node(s) answered)") {
		t.Errorf("exit %d: want one node counted in the tags diagnosis", code)
	}
	if replayed.Load() == 0 {
		t.Error("the bus reader replayed nothing: the test tests nothing")
	}
}

// TestAttackReplayedListMigratesTwice: node A drains with one service, node B bids; a
// bus reader replays every signed answer. Before, --migrate read A's list answer twice
// and cloned the service twice (B started it twice; with a real node the second clone
// fails, the old copy stopped, and counts as a failed migration). Now once.
func TestAttackReplayedListMigratesTwice(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	def := "default"
	a := newSigningFakeNode(t, op.Connect(t, "node a"), nil)
	a.bid = false // draining: no bid
	a.stopOK = true
	a.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, StartTime: "2026-11-27T11:00:00Z",
		WorkloadType: "native", WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{}}}
	a.stored["W1"] = protocol.StartWorkloadRequest{Name: "web", Namespace: def, Description: "d", WorkloadType: "native",
		WorkloadLifecycle: "service", RunRequest: `{"uri":"file:///bin/true"}`, Tags: map[string]string{}}
	a.start()
	b := newSigningFakeNode(t, op.Connect(t, "node b"), nil).start()
	replayed := replaySignedAnswers(t, op)

	out, errOut, code := runCLI(t, nil, opArgs(t, op, "node", "lameduck", a.id, "--delay", "1m", "--migrate")...)
	t.Logf("node lameduck --migrate: exit %d\n%s%s", code, out, errOut)
	if n := len(b.deployed()); n != 1 || code != 0 || strings.Contains(errOut, "could not be migrated") {
		t.Errorf("exit %d, node b started the service %d times: want it migrated once", code, n)
	}
	if replayed.Load() == 0 {
		t.Error("the bus reader replayed nothing: the test tests nothing")
	}
}

// TestRealNodeAnswersVerifyBesideRogue: a real node.Node's INFO, PTAGS and LAMEDUCK
// answers (its signing code, not the fake's) verify: none is refused or noted as
// unsigned, and the rogue's unsigned INFO and LAMEDUCK answers in its name are refused.
// Not an attack that failed before by itself: the real node answers about as fast as
// the rogue, which the fake nodes' attack tests above make sure of.
func TestRealNodeAnswersVerifyBesideRogue(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	n := startRealNode(t, op.Server.ClientURL(), node.Options{NC: op.Connect(t, "node"), Name: "real", Nexus: "west"})
	rogueAnswers(t, op, protocol.InfoSubject("*"), func(*nats.Msg) *nats.Msg {
		return jsonMsg(t, protocol.NodeInfoResponse{NodeID: n.ID(), Version: "6.6.6", Tags: map[string]string{}}, nats.Header{protocol.HeaderNode: {n.ID()}})
	})
	rogueAnswers(t, op, protocol.LameduckSubject("*"), func(*nats.Msg) *nats.Msg {
		return jsonMsg(t, protocol.LameduckResponse{Message: "forged: node busy"}, nats.Header{protocol.HeaderNode: {n.ID()}})
	})
	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--json", "node", "info", "real")...)
	t.Logf("node info: exit %d\n%s%s", code, out, errOut)
	var info protocol.NodeInfoResponse
	if err := json.Unmarshal([]byte(out), &info); err != nil || code != 0 || info.Version != "0.1.0" {
		t.Errorf("node info: exit %d, %v, version %q: want the real node's own info", code, err, info.Version)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "--namespace", "default", "workload", "run", "--name", "x", "--tags", "region=moon", "--", "/bin/true")...)
	t.Logf("workload run: exit %d\n%s%s", code, out, errOut)
	if code != 1 || !strings.Contains(errOut, "no node offers tag(s) region=moon (1 node(s) answered)") || strings.Contains(errOut, "warning") {
		t.Errorf("exit %d: want the real node's tags alone in the diagnosis, and no warning", code)
	}
	out, errOut, code = runCLI(t, nil, opArgs(t, op, "node", "lameduck", "real", "--delay", "1m")...)
	t.Logf("node lameduck: exit %d\n%s%s", code, out, errOut)
	if code != 0 || !strings.Contains(out, "successfully commanded") || strings.Contains(errOut, "not verified") {
		t.Errorf("node lameduck: exit %d: want the real node's own answer", code)
	}
}
