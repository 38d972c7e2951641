package node

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/protocol"
)

// TestMalformedEverySubject sends broken and mistyped bodies to every subject the node
// serves: each gets a 400 with {error_id, error}, and the node keeps serving.
func TestMalformedEverySubject(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) { o.AllowRemoteRegistration = true })
	n := f.nodes[0]
	a := f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	sys := protocol.ControlPrefix(protocol.SystemNamespace)
	garbage := []string{`{`, `]`, `"just a string"`, `12`, `{"a":`, "\x00\xff"}
	cases := []struct {
		name    string
		subject func() string // fresh subject per body (deploy needs a new bid each time)
		bodies  []string
	}{
		{"ping", protocol.PingSubject, append([]string{``, `{}`, `{"filter":5}`, `{"filter":["a"]}`, `[]`}, garbage...)},
		{"ping node", func() string { return protocol.PingNodeSubject(n.ID()) }, append([]string{`{}`, `{"filter":{"a":1}}`}, garbage...)},
		{"info", func() string { return protocol.InfoSubject(n.ID()) }, append([]string{`[]`, `[{}]`}, garbage...)},
		{"lameduck", func() string { return protocol.LameduckSubject(n.ID()) },
			append([]string{``, `{}`, `{"delay":5}`, `{"delay":"-1s"}`, `{"delay":"soon"}`, `{"delay":"1m","tag":"x"}`}, garbage...)},
		{"agent id", func() string { return sys + ".AGENTID." + n.ID() }, []string{``, `   `}},
		{"auction", func() string { return protocol.AuctionSubject("tenant") },
			append([]string{``, `{}`, `{"agent_type":1,"auction_id":"a","tags":{}}`, `{"agent_type":"native","auction_id":"a","tags":[]}`,
				`{"agent_type":"native","auction_id":"a","tags":{},"nexd_workload_lifecycle":"forever"}`}, garbage...)},
		{"deploy", func() string {
			bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
			if len(bids) != 1 {
				t.Fatal("no bid")
			}
			return protocol.DeploySubject("tenant", bids[0].BidderID)
		}, append([]string{``, `{}`, `{"name":"w"}`, strings.Replace(string(mustJSON(t, startReq("tenant", "w", `{}`))), `"tags":{}`, `"tags":7`, 1),
			strings.Replace(string(mustJSON(t, startReq("tenant", "w", `{}`))), `"run_request":"{}"`, `"run_request":{}`, 1)}, garbage...)},
		{"undeploy", func() string { return protocol.UndeploySubject("tenant", "W1") }, append([]string{``, `{}`, `{"namespace":5}`}, garbage...)},
		{"clone", func() string { return protocol.CloneSubject("tenant", "W1") },
			append([]string{``, `{}`, `{"namespace":"tenant"}`, `{"namespace":"tenant","new_target_xkey":1}`}, garbage...)},
		{"wping", func() string { return protocol.WPingSubject("tenant") },
			append([]string{``, `{}`, `{"namespace":"tenant","filter":"x"}`, `{"namespace":["tenant"],"filter":[]}`}, garbage...)},
		{"register", func() string { n.ExpectAgent("newagent", "x"); return protocol.RegisterSubject(n.ID(), "newagent") },
			append([]string{``, `{}`, `{"name":1}`,
				`{"description":"","max_workloads":0,"name":"x","public_xkey":"","register_type":"","start_request_schema":"{}","version":""}`,
				`{"description":"","max_workloads":0,"name":"x","public_xkey":"","register_type":"t","start_request_schema":"{not json","version":""}`,
				`{"description":"","max_workloads":0,"name":"x","public_xkey":"","register_type":"t","start_request_schema":"{\"type\":7}","version":""}`,
				`{"description":"","max_workloads":0,"name":"x","public_xkey":"","register_type":"t","start_request_schema":"{\"$ref\":\"file:///etc/passwd\"}","version":""}`,
				`{"description":"","max_workloads":-1,"name":"x","public_xkey":"","register_type":"t","start_request_schema":"{}","version":""}`,
				`{"description":"","max_workloads":0,"name":"x","public_xkey":"","register_type":"t","start_request_schema":"{}","version":"","supported_lifecycles":["forever"]}`,
			}, garbage...)},
		{"remote register", func() string { return protocol.RemoteRegisterSubject("testnexus") }, append([]string{``, `[]`}, garbage...)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, body := range tc.bodies {
				m := request(t, f.client, tc.subject(), []byte(body))
				code, eb := errorReply(t, m)
				if code != "400" {
					t.Errorf("body %q: code %s (%s)", body, code, eb.Error)
				}
				if strings.ContainsAny(m.Header.Get(protocol.HeaderError), "\r\n") {
					t.Errorf("body %q: multi-line error header", body)
				}
			}
		})
	}
	// Garbage heartbeats are ignored.
	for _, g := range garbage {
		_ = f.client.Publish(protocol.AgentHeartbeatSubject(n.ID(), "agent0"), []byte(g))
	}
	// Still serving, the nexlet still healthy, nothing registered by accident.
	var p protocol.NodePingResponse
	if err := protocol.Decode(request(t, f.client, protocol.PingNodeSubject(n.ID()), `{"filter":{}}`).Data, &p); err != nil {
		t.Fatal(err)
	}
	if p.AgentCount != 1 || p.State != protocol.NodeRunning {
		t.Errorf("after malformed input: %+v", p)
	}
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1); len(got) != 1 {
		t.Error("node stopped bidding")
	}
	_ = a
}

// recReq records what a handler sends; it checks the reply rules on the way.
type recReq struct {
	t       testing.TB
	subject string
	data    []byte

	mu      sync.Mutex
	replies int
	code    string
	body    []byte
}

func (r *recReq) Respond(b []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{}
	for _, o := range opts {
		o(m)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.replies++
	r.body = b
	return nil
}

func (r *recReq) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		r.t.Errorf("reply does not marshal: %v", err)
		return err
	}
	return r.Respond(b, opts...)
}

func (r *recReq) Error(code, desc string, data []byte, _ ...micro.RespondOpt) error {
	if code == "" || desc == "" || strings.ContainsAny(desc, "\r\n") {
		r.t.Errorf("bad error reply: code %q description %q", code, desc)
	}
	var eb protocol.ErrorBody
	if err := json.Unmarshal(data, &eb); err != nil || eb.ErrorID == "" || eb.Error == "" {
		r.t.Errorf("bad error body %q: %v", data, err)
	}
	if strings.HasPrefix(code, "5") && eb.Error != internalErrorText {
		r.t.Errorf("5xx error text not redacted: %q", eb.Error)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.replies++
	r.code = code
	r.body = data
	return nil
}

func (r *recReq) Data() []byte           { return r.data }
func (r *recReq) Headers() micro.Headers { return micro.Headers{} }
func (r *recReq) Subject() string        { return r.subject }
func (r *recReq) Reply() string          { return "_INBOX.fuzz" }

// FuzzHandlers feeds random bytes to every handler of a running node with a
// registered nexlet: no panic, at most one reply, and well-formed error replies.
func FuzzHandlers(f *testing.F) {
	fx := newFixture(f, 1, func(_ int, o *Options) {
		o.AllowRemoteRegistration = true
		o.FanoutTimeout = 200 * time.Millisecond
		o.CloneTimeout = 100 * time.Millisecond
		o.StartTimeout = 2 * time.Second
	})
	n := fx.nodes[0]
	fx.healthyAgent(n, "agent0", "go_exec", "native", nil)
	for _, s := range []string{``, `{`, `null`, `{}`, `[]`, `{"filter":{}}`, `{"delay":"1h"}`, `{"namespace":"tenant","filter":[]}`,
		`{"namespace":"tenant","new_target_xkey":"X"}`, `{"agent_type":"native","auction_id":"a","tags":{}}`,
		string(mustJSON(f, startReq("tenant", "w", `{"cmd":"x"}`))), string(mustJSON(f, startReq("tenant", "w", `{"n":"x"}`))),
		`{"description":"","max_workloads":0,"name":"fz","public_xkey":"","register_type":"t","start_request_schema":"{\"type\":\"object\"}","version":""}`,
	} {
		f.Add([]byte(s))
	}
	n.mu.Lock()
	base := n.agents["agent0"]
	n.mu.Unlock()
	sys := protocol.ControlPrefix(protocol.SystemNamespace)
	handlers := []struct {
		subject string
		h       func(micro.Request)
	}{
		{protocol.PTagsSubject(), n.handlePTags},
		{protocol.PingSubject(), n.handlePing},
		{protocol.InfoSubject(n.ID()), n.handleInfo},
		{protocol.LameduckSubject(n.ID()), n.handleLameduck},
		{sys + ".AGENTID." + n.ID(), n.handleAgentID},
		{protocol.AuctionSubject("tenant"), n.handleAuction},
		{protocol.DeploySubject("tenant", "FUZZBID"), n.handleDeploy},
		{protocol.UndeploySubject("tenant", "W1"), n.handleUndeploy},
		{protocol.CloneSubject("tenant", "W1"), n.handleClone},
		{protocol.WPingSubject("tenant"), n.handleWPing},
		// handleRegister's work, without its goroutine: r is answered here.
		{protocol.RegisterSubject(n.ID(), "fuzzagent"), func(r micro.Request) { n.register(r, nil) }},
		{protocol.RemoteRegisterSubject("testnexus"), n.handleRemoteRegister},
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		watchdog := time.AfterFunc(15*time.Second, func() {
			_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
			panic(fmt.Sprintf("handlers stuck on input %q", data))
		})
		defer watchdog.Stop()
		for _, h := range handlers {
			if strings.Contains(h.subject, "FUZZBID") {
				n.mu.Lock()
				n.bids.add("FUZZBID", bid{agentID: "agent0", ns: "tenant", expires: time.Now().Add(time.Minute)})
				n.mu.Unlock()
			}
			r := &recReq{t: t, subject: h.subject, data: data}
			h.h(r)
			if r.replies > 1 {
				t.Fatalf("%s: %d replies to %q", h.subject, r.replies, data)
			}
		}
		// A heartbeat of random bytes must not break anything either.
		n.onHeartbeat(&nats.Msg{Subject: protocol.AgentHeartbeatSubject(n.ID(), "agent0"), Data: data})
		// Each input starts from the same node: one healthy nexlet, not draining.
		n.mu.Lock()
		n.agents = map[string]*registration{"agent0": base}
		base.lastSeen, base.lastBeat, base.summary.State = time.Now(), time.Now(), "running"
		n.lameduck, n.state = time.Time{}, protocol.NodeRunning
		n.mu.Unlock()
	})
}

// TestReplyOnlyToInboxes: a requester picks the reply subject, and the node answers
// with its own permissions; a reply subject outside the inboxes would make the node
// publish where the requester may not (another namespace's subjects, $NEX.FEED events).
// Such a request is dropped; the same request from an inbox is answered.
func TestReplyOnlyToInboxes(t *testing.T) {
	f := newFixture(t, 1, nil)
	f.healthyAgent(f.nodes[0], "agent1", "go_exec", "native", nil)
	ping := mustJSON(t, protocol.NodePingRequest{Filter: map[string]string{}})
	auction := mustJSON(t, protocol.AuctionRequest{AgentType: "native", AuctionID: "a1", Tags: map[string]string{}})
	for _, victim := range []string{"tenant-b.orders", protocol.EventSubject("tenant-b", protocol.EventWorkloadStopped)} {
		ch := make(chan *nats.Msg, 4)
		sub, err := f.client.ChanSubscribe(victim, ch)
		if err != nil {
			t.Fatal(err)
		}
		for subj, body := range map[string][]byte{protocol.PingSubject(): ping, protocol.AuctionSubject("tenant-a"): auction} {
			if err := f.client.PublishRequest(subj, victim, body); err != nil {
				t.Fatal(err)
			}
			// The same request from an inbox is answered, so the node did read it.
			if got := collect(t, f.client, subj, body, 1, 10*time.Second, 100*time.Millisecond); len(got) != 1 {
				t.Fatalf("%s from an inbox: %d replies, want 1", subj, len(got))
			}
		}
		select {
		case m := <-ch:
			t.Errorf("the node published on %s, a reply subject a requester chose: %s", victim, m.Data)
		case <-time.After(300 * time.Millisecond):
		}
		_ = sub.Unsubscribe()
	}
}
