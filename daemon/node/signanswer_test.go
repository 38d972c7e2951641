package node

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// collectWith is collect with the request's headers h.
func collectWith(t testing.TB, nc *nats.Conn, subject string, body []byte, h nats.Header, want int) []*nats.Msg {
	t.Helper()
	inbox := nc.NewInbox()
	ch := make(chan *nats.Msg, 64)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: body, Header: h}); err != nil {
		t.Fatal(err)
	}
	var out []*nats.Msg
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		var wait <-chan time.Time
		if len(out) >= want {
			wait = time.After(300 * time.Millisecond)
		}
		select {
		case m := <-ch:
			out = append(out, m)
		case <-wait:
			return out
		case <-deadline.C:
			return out
		}
	}
}

// TestNodeSignsAnswers: every reply a node sends a client that sent a nonce (ping,
// deploy keep-alive, answer and refusal, list acknowledgement and answer, clone, the
// stop's word and answers) carries its node id, a number of its own (HeaderSeq: a
// keep-alive's copy is told from the next) and its signature over the nonce, the
// subject, the headers and the body, which protocol.VerifyAnswer (nexctl's check)
// takes; a reply to a request without a nonce (upstream's client) is as before,
// unsigned.
func TestNodeSignsAnswers(t *testing.T) {
	f := newFixture(t, 2, nil)
	for i, n := range f.nodes {
		f.healthyAgent(n, "agent"+string(rune('0'+i)), "go_exec", "native", nil)
	}
	ids := map[string]bool{f.nodes[0].ID(): true, f.nodes[1].ID(): true}
	nonce := "n0nce-1"
	seqs := map[string]string{} // HeaderSeq -> the reply's node: each signed reply its own
	check := func(what, subject string, msgs []*nats.Msg, want int, from string) {
		t.Helper()
		if len(msgs) < want {
			t.Fatalf("%s: %d replies, want %d", what, len(msgs), want)
		}
		for _, m := range msgs {
			key := m.Header.Get(protocol.HeaderNode) + " " + m.Header.Get(protocol.HeaderSeq)
			if m.Header.Get(protocol.HeaderSeq) == "" || seqs[key] != "" {
				t.Errorf("%s: reply %v: want a %s of its own (taken by %q)", what, m.Header, protocol.HeaderSeq, seqs[key])
			}
			seqs[key] = what
			node, err := protocol.VerifyAnswer(nonce, subject, m.Header, m.Data)
			if err != nil || !ids[node] || (from != "" && node != from) {
				t.Errorf("%s: reply %v %q: node %q, %v", what, m.Header, m.Data, node, err)
			}
			if _, err := protocol.VerifyAnswer("other", subject, m.Header, m.Data); err == nil {
				t.Errorf("%s: reply verifies for another nonce", what)
			}
		}
	}
	signed := nats.Header{protocol.HeaderNonce: {nonce}, protocol.HeaderProgress: {"1"}}

	check("ping", protocol.PingSubject(), collectWith(t, f.client, protocol.PingSubject(), []byte(`{"filter":{}}`), signed, 2), 2, "")
	for _, m := range collectWith(t, f.client, protocol.PingSubject(), []byte(`{"filter":{}}`), nil, 2) {
		if m.Header.Get(protocol.HeaderSig) != "" {
			t.Errorf("ping without a nonce answered signed: %v", m.Header)
		}
	}

	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-1"}}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	holder := f.nodes[1].ID()
	req := startReq("tenant", "hello", `{"cmd":"echo hi"}`)
	subj := protocol.DeploySubject("tenant", bids[0].BidderID)
	h := nats.Header{protocol.HeaderNonce: {nonce}, protocol.HeaderProgress: {"1"}, protocol.HeaderAlive: {"1s"}}
	deploy := collectWith(t, f.client, subj, mustJSON(t, req), h, 2) // a keep-alive, the answer
	check("deploy", subj, deploy, 2, holder)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(deploy[len(deploy)-1].Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy answer %q: %v", deploy[len(deploy)-1].Data, err)
	}
	// A refusal (micro error headers, not started).
	bids = f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-1"}}, 1)
	bad := startReq("tenant", "bad", `{"cmd":"x"}`)
	bad.WorkloadType = "nope"
	subj = protocol.DeploySubject("tenant", bids[0].BidderID)
	refused := collectWith(t, f.client, subj, mustJSON(t, bad), nats.Header{protocol.HeaderNonce: {nonce}}, 1)
	check("refused deploy", subj, refused, 1, holder)
	if refused[0].Header.Get(protocol.HeaderErrorCode) == "" || refused[0].Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
		t.Errorf("refusal %v %q", refused[0].Header, refused[0].Data)
	}

	subj = protocol.WPingSubject("tenant")
	check("list", subj, collectWith(t, f.client, subj, mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: "tenant", Filter: []string{}}), signed, 4), 4, "")

	subj = protocol.CloneSubject("tenant", started.ID)
	check("clone", subj, collectWith(t, f.client, subj, mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "tenant"}), signed, 1), 1, holder)

	subj = protocol.UndeploySubject("tenant", started.ID)
	stops := collectWith(t, f.client, subj, mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant"}), signed, 3) // word, two answers
	check("stop", subj, stops, 3, "")

	// Without a nonce (upstream's client): unsigned, as before.
	bids = f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-0"}}, 1)
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "plain", `{"cmd":"x"}`))
	if m.Header.Get(protocol.HeaderSig) != "" || m.Header.Get(protocol.HeaderNode) != "" {
		t.Errorf("deploy without a nonce answered with %v", m.Header)
	}
}
