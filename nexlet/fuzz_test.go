package nexlet

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// fuzzReq is a request handed straight to a handler; it records the replies.
type fuzzReq struct {
	subject string
	data    []byte
	mu      sync.Mutex
	replies int
	errCode string
	errText string
}

func (r *fuzzReq) Respond(b []byte, _ ...micro.RespondOpt) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.replies++
	return nil
}

func (r *fuzzReq) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return r.Respond(b, opts...)
}

func (r *fuzzReq) Error(code, desc string, data []byte, _ ...micro.RespondOpt) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.replies++
	r.errCode, r.errText = code, desc
	return nil
}

func (r *fuzzReq) Data() []byte           { return r.data }
func (r *fuzzReq) Headers() micro.Headers { return micro.Headers{} }
func (r *fuzzReq) Subject() string        { return r.subject }
func (r *fuzzReq) Reply() string          { return "_INBOX.fuzz" }

// FuzzRunnerHandlers feeds arbitrary bodies to every handler a nexlet built on the
// SDK serves the node (start, stop, get, list, ping, lame duck), as a node, or anyone
// able to publish on its subjects, may send: no panic, no hang, at most one reply, and
// an error reply carries the SDK's code and a message.
func FuzzRunnerHandlers(f *testing.F) {
	start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "w1", Namespace: "ns",
		Tags: map[string]string{}, WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "mem", RunRequest: "{}"}})
	for _, s := range []string{string(start), strings.Replace(string(start), `"name":"w1"`, `"name":"fail"`, 1),
		"", "{", "[]", "null", `{"namespace":5,"filter":"x","delay":3}`, `{"namespace":"ns","filter":[]}`,
		`{"namespace":"ns","record_ack":true}`, `{"delay":"1m"}`, `{"delay":"-1s"}`, `{"new_target_xkey":"X","namespace":"ns"}`} {
		f.Add([]byte(s))
	}
	srv := testnats.Start(f, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(f, srv)
	regs := make(chan protocol.RegisterAgentRequest, 1)
	fakeNode(f, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	a := newMemAgent()
	r, err := NewRunner(f.Context(), node, a, WithHeartbeatInterval(time.Hour))
	if err != nil {
		f.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = r.Shutdown() })
	<-regs
	handlers := []struct {
		subject string
		h       func(micro.Request)
	}{
		{protocol.StartWorkloadSubject(node, agent, "W1"), r.handleStart},
		{protocol.StopWorkloadSubject(node, "W1"), r.handleStop},
		{protocol.GetWorkloadSubject(node, "W1"), r.handleGet},
		{protocol.QueryWorkloadsSubject(node), func(q micro.Request) { r.handleQuery(1<<20, q) }},
		{protocol.SetLameduckAgentsSubject(node), r.handleLameduck},
		{protocol.PingAgentSubject(node, agent), r.handlePing},
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, h := range handlers {
			q := &fuzzReq{subject: h.subject, data: data}
			done := make(chan struct{})
			go func() { defer close(done); h.h(q) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: no return 10 s after %q", h.subject, data)
			}
			q.mu.Lock()
			replies, code, text := q.replies, q.errCode, q.errText
			q.mu.Unlock()
			if replies > 1 {
				t.Fatalf("%s: %d replies to %q", h.subject, replies, data)
			}
			if code != "" && (code != ErrorCode && code != BadRequestCode || text == "") {
				t.Fatalf("%s: error reply %q %q to %q", h.subject, code, text, data)
			}
		}
	})
}
