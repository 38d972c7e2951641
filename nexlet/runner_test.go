package nexlet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

const (
	node  = "NODE1"
	agent = "AGENT1"
)

// memAgent is a tiny in-memory nexlet: it "runs" workloads by remembering them.
type memAgent struct {
	mu        sync.Mutex
	workloads map[string]protocol.StartWorkloadRequest
	replayed  map[string]bool
	lameduck  time.Duration
}

func newMemAgent() *memAgent {
	return &memAgent{workloads: map[string]protocol.StartWorkloadRequest{}, replayed: map[string]bool{}}
}

func (a *memAgent) Register() (*protocol.RegisterAgentRequest, error) {
	return &protocol.RegisterAgentRequest{Name: "mem", RegisterType: "mem", Description: "test", Version: "1.2.3",
		PublicXKey: "XKEY", StartRequestSchema: `{"type":"object"}`, SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleJob}}, nil
}

func (a *memAgent) Heartbeat() (*protocol.AgentHeartbeat, error) {
	s, _ := a.Ping()
	return &protocol.AgentHeartbeat{Data: "{}", Summary: *s}, nil
}

func (a *memAgent) StartWorkload(id string, req *protocol.AgentStartWorkloadRequest, existing bool) (*protocol.StartWorkloadResponse, error) {
	if req.Request.Name == "fail" {
		return nil, errors.New("refusing to start fail")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.workloads[id] = req.Request
	if existing {
		a.replayed[id] = true
	}
	return &protocol.StartWorkloadResponse{ID: id, Name: req.Request.Name}, nil
}

func (a *memAgent) StopWorkload(id string, _ *protocol.StopWorkloadRequest) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.workloads[id]; !ok {
		return errors.New(protocol.ErrTextWorkloadNotFound)
	}
	delete(a.workloads, id)
	return nil
}

func (a *memAgent) GetWorkload(id, _ string) (*protocol.StartWorkloadRequest, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	w, ok := a.workloads[id]
	if !ok {
		return nil, errors.New(protocol.ErrTextWorkloadNotFound)
	}
	return &w, nil
}

func (a *memAgent) QueryWorkloads(ns string, _ []string) ([]protocol.WorkloadSummary, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []protocol.WorkloadSummary
	for id, w := range a.workloads {
		if ns == protocol.SystemNamespace || ns == w.Namespace {
			out = append(out, protocol.WorkloadSummary{ID: id, Name: w.Name, WorkloadState: protocol.WorkloadRunning})
		}
	}
	return out, nil
}

func (a *memAgent) SetLameduck(before time.Duration) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.lameduck = before
	return nil
}

func (a *memAgent) Ping() (*protocol.AgentSummary, error) {
	return &protocol.AgentSummary{Name: "mem", Type: "mem", State: "running", SupportedLifecycles: "job", Version: "1.2.3"}, nil
}

// node answers REGISTER like a node would, handing out the given existing state.
func fakeNode(t testing.TB, nc *nats.Conn, url string, resp *protocol.RegisterAgentResponse, got chan<- protocol.RegisterAgentRequest) {
	t.Helper()
	_, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) {
		var req protocol.RegisterAgentRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			t.Errorf("register request: %v", err)
		}
		got <- req
		r := *resp
		r.ConnectionData = protocol.NatsConnectionData{NatsServers: []string{url}}
		b, _ := json.Marshal(r)
		_ = m.Respond(b)
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
}

func TestRunnerAgentPlane(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	hbs, _ := nc.SubscribeSync(protocol.AgentHeartbeatSubject(node, agent))
	events, _ := nc.SubscribeSync("$NEX.FEED.>")
	regs := make(chan protocol.RegisterAgentRequest, 1)
	replay := protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "old", Namespace: "ns"}}
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node,
		ExistingState: map[string]protocol.AgentStartWorkloadRequest{"W0": replay}}, regs)

	a := newMemAgent()
	r, err := NewRunner(context.Background(), node, a, WithHeartbeatInterval(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	if reg := <-regs; reg.Name != "mem" || reg.RegisterType != "mem" {
		t.Errorf("registration = %+v", reg)
	}
	for range 2 { // one at once, then periodic
		m, err := hbs.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatal("no heartbeat:", err)
		}
		var hb protocol.AgentHeartbeat
		if err := protocol.Decode(m.Data, &hb); err != nil || hb.Summary.Name != "mem" {
			t.Errorf("heartbeat %s: %v", m.Data, err)
		}
	}
	testkit.Eventually(t, "replay", func() bool { a.mu.Lock(); defer a.mu.Unlock(); return a.replayed["W0"] })

	req := func(subj string, body string) *nats.Msg {
		t.Helper()
		m, err := nc.Request(subj, []byte(body), 10*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", subj, err)
		}
		return m
	}
	start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "w1", Namespace: "ns",
		Tags: map[string]string{}, WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "mem", RunRequest: "{}"}})
	m := req(protocol.StartWorkloadSubject(node, agent, "W1"), string(start))
	var sr protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &sr); err != nil || sr.ID != "W1" || sr.Name != "w1" {
		t.Errorf("start reply %s: %v", m.Data, err)
	}
	// An agent error: code 100, message, and the response as body.
	failing := strings.Replace(string(start), `"name":"w1"`, `"name":"fail"`, 1)
	m = req(protocol.StartWorkloadSubject(node, agent, "W2"), failing)
	if m.Header.Get(protocol.HeaderErrorCode) != ErrorCode || m.Header.Get(protocol.HeaderError) != "refusing to start fail" ||
		!strings.Contains(string(m.Data), `"id":"W2"`) {
		t.Errorf("failing start: %v %s", m.Header, m.Data)
	}
	// Malformed input on every subject with a body: an error reply, never a crash.
	for _, subj := range []string{protocol.StartWorkloadSubject(node, agent, "W3"), protocol.StopWorkloadSubject(node, "W1"),
		protocol.QueryWorkloadsSubject(node), protocol.SetLameduckAgentsSubject(node)} {
		for _, bad := range []string{"", "{", `{"namespace":5,"filter":"x","delay":3}`, "[]"} {
			want := ErrorCode
			if subj == protocol.StartWorkloadSubject(node, agent, "W3") {
				want = BadRequestCode // a start request that does not decode
			}
			if m := req(subj, bad); m.Header.Get(protocol.HeaderErrorCode) != want {
				t.Errorf("%s with %q: no error reply (%s)", subj, bad, m.Data)
			}
		}
	}
	// GETWORKLOAD: the request, or silence when unknown.
	m = req(protocol.GetWorkloadSubject(node, "W1"), "{}")
	var got protocol.StartWorkloadRequest
	if err := json.Unmarshal(m.Data, &got); err != nil || got.Name != "w1" {
		t.Errorf("get: %s", m.Data)
	}
	if m := req(protocol.GetWorkloadSubject(node, "W1"), "{"); m.Header.Get(protocol.HeaderErrorCode) != ErrorCode {
		t.Errorf("get with malformed body: %v %s", m.Header, m.Data)
	}
	if _, err := nc.Request(protocol.GetWorkloadSubject(node, "NOPE"), []byte("{}"), 300*time.Millisecond); !errors.Is(err, nats.ErrTimeout) {
		t.Errorf("get of unknown workload: %v, want silence", err)
	}
	// QUERYWORKLOADS.
	m = req(protocol.QueryWorkloadsSubject(node), `{"namespace":"ns","filter":[]}`)
	var list []protocol.WorkloadSummary
	if err := json.Unmarshal(m.Data, &list); err != nil || len(list) != 2 {
		t.Errorf("query: %s", m.Data)
	}
	m = req(protocol.QueryWorkloadsSubject(node), `{"namespace":"empty","filter":[]}`)
	if string(m.Data) != "[]" {
		t.Errorf("empty query = %s, want []", m.Data)
	}
	// STOPWORKLOAD: stopped, then unknown is an error "100" with stopped:false.
	m = req(protocol.StopWorkloadSubject(node, "W1"), `{"namespace":"ns"}`)
	var stop protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &stop); err != nil || !stop.Stopped || stop.WorkloadType != "mem" {
		t.Errorf("stop: %s %v", m.Data, err)
	}
	m = req(protocol.StopWorkloadSubject(node, "W1"), `{"namespace":"ns"}`)
	_ = json.Unmarshal(m.Data, &stop)
	if m.Header.Get(protocol.HeaderErrorCode) != ErrorCode || stop.Stopped {
		t.Errorf("stop of unknown: %v %s", m.Header, m.Data)
	}
	// Pings carry the agent id header.
	for _, subj := range []string{protocol.PingAgentSubject(node, agent), protocol.PingAllAgentsSubject(node)} {
		m = req(subj, "")
		var s protocol.AgentSummary
		if err := json.Unmarshal(m.Data, &s); err != nil || s.Name != "mem" || m.Header.Get("agentId") != agent {
			t.Errorf("%s: %v %s", subj, m.Header, m.Data)
		}
	}
	m = req(protocol.SetLameduckAgentsSubject(node), `{"delay":"2m"}`)
	var lr protocol.LameduckResponse
	a.mu.Lock()
	ld := a.lameduck
	a.mu.Unlock()
	if err := protocol.Decode(m.Data, &lr); err != nil || !lr.Success || ld != 2*time.Minute {
		t.Errorf("lameduck: %s %v", m.Data, ld)
	}
	// Logs and events.
	if _, err := r.Logger("W1", "ns", "stdout").Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := r.EmitEvent("ns", protocol.EventWorkloadStarted, protocol.WorkloadStartedEvent{ID: "W1", Namespace: "ns"}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]*nats.Msg{}
	for len(seen) < 2 {
		m, err := events.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		seen[m.Subject] = m
	}
	if m := seen[protocol.LogSubject("ns", "W1", "stdout")]; m == nil || string(m.Data) != "hello" || m.Header.Get(FeedHeader(protocol.HeaderNamespace)) != "ns" {
		t.Errorf("log message: %+v", m)
	}
	if m := seen[protocol.EventSubject("ns", protocol.EventWorkloadStarted)]; m == nil || !strings.Contains(string(m.Data), `"id":"W1"`) {
		t.Errorf("event message: %+v", m)
	}
}

func TestRunnerRegistrationRefused(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: false, Message: "no such type"}, make(chan protocol.RegisterAgentRequest, 1))
	r, _ := NewRunner(context.Background(), node, newMemAgent())
	err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}})
	if err == nil || !strings.Contains(err.Error(), "no such type") {
		t.Errorf("Run = %v", err)
	}
	// No node at all: a bounded wait and a clear error.
	r, _ = NewRunner(context.Background(), "OTHER", newMemAgent(), WithRegisterTimeout(200*time.Millisecond))
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err == nil || !strings.Contains(err.Error(), "REGISTER") {
		t.Errorf("Run without node = %v", err)
	}
}

// TestRunnerPatientStart: a nexlet its node starts before the node can answer (nexd's
// native nexlet, started while nexd connects) waits with WithPatientStart: for a NATS
// server nothing listens for yet, then for a node to answer its registration, and is
// registered once both are there; without the option, the same start fails at once.
func TestRunnerPatientStart(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	creds := protocol.NatsConnectionData{NatsServers: []string{url}}

	impatient, _ := NewRunner(context.Background(), node, newMemAgent(), WithRegisterTimeout(time.Second))
	if err := impatient.Run(agent, creds); err == nil || !errors.Is(err, nats.ErrNoServers) {
		t.Fatalf("Run without a server, not patient = %v, want no servers at once", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The native nexlet dials ahead, while it builds itself.
	dial := DialAhead(ctx, creds, "nexlet-mem-register", slog.New(slog.DiscardHandler))
	defer dial.Close()
	r, _ := NewRunner(ctx, node, newMemAgent(), WithRegisterTimeout(time.Second), WithPatientStart(), WithRegistrationDial(dial))
	ran := make(chan error, 1)
	go func() { ran <- r.Run(agent, creds) }()
	time.Sleep(300 * time.Millisecond)
	srv := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) { o.Port = port }})
	nc := testnats.Connect(t, srv)
	// Past the register timeout, nothing answering: still waiting.
	time.Sleep(1500 * time.Millisecond)
	select {
	case err := <-ran:
		t.Fatalf("Run returned before a node answered: %v", err)
	default:
	}
	regs := make(chan protocol.RegisterAgentRequest, 1)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	if err := <-ran; err != nil {
		t.Fatalf("patient Run = %v", err)
	}
	<-regs
	_ = r.Shutdown()

	// A refusal still ends a patient start at once.
	r, _ = NewRunner(ctx, node, newMemAgent(), WithPatientStart())
	nc2 := testnats.Connect(t, srv)
	_, _ = nc2.Subscribe(protocol.RegisterSubject(node, "AGENT2"), func(m *nats.Msg) {
		b, _ := json.Marshal(protocol.RegisterAgentResponse{Success: false, Message: "no such type"})
		_ = m.Respond(b)
	})
	_ = nc2.Flush()
	if err := r.Run("AGENT2", protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err == nil || !strings.Contains(err.Error(), "no such type") {
		t.Errorf("patient Run refused = %v", err)
	}
}

func TestRemoteInit(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	if _, err := RemoteInit(context.Background(), nc, "nexus"); err == nil {
		t.Error("RemoteInit without a node succeeded")
	}
	_, _ = nc.QueueSubscribe(protocol.RemoteRegisterSubject("nexus"), "nexus", func(m *nats.Msg) {
		_ = m.Respond([]byte(`{"assigned_agent_id":"A9","respond_to":"NODEPUB","registration_creds":{"conn_name":"","nats_servers":["nats://x:4222"],"nats_user_jwt":"","nats_user_name":"","nats_user_nkey":"","nats_user_password":"","nats_user_seed":"","tls_ca":"","tls_cert":"","tls_first":false,"tls_key":""}}`))
	})
	resp, err := RemoteInit(context.Background(), nc, "nexus")
	if err != nil || resp.AssignedAgentID != "A9" || resp.RespondTo != "NODEPUB" || resp.RegistrationCreds.NatsServers[0] != "nats://x:4222" {
		t.Errorf("RemoteInit = %+v, %v", resp, err)
	}
}

func TestEnv(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	tests := []struct {
		name    string
		vars    map[string]string
		servers []string
		wantErr string
	}{
		{"required", map[string]string{}, nil, EnvNatsServers},
		{"bad jwt", map[string]string{EnvNatsServers: "nats://a:1", EnvNatsJWT: "%%"}, nil, EnvNatsJWT},
		{"list", map[string]string{EnvNatsServers: " nats://a:1, nats://b:2 ,", EnvNatsSeed: "SU", EnvNatsJWT: "Sg=="}, []string{"nats://a:1", "nats://b:2"}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cd, err := ConnDataFromEnv(env(tc.vars))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("err = %v", err)
				}
				return
			}
			if err != nil || strings.Join(cd.NatsServers, " ") != strings.Join(tc.servers, " ") || cd.NatsUserSeed != "SU" || cd.NatsUserJWT != "J" {
				t.Errorf("cd = %+v, %v", cd, err)
			}
		})
	}
	if _, _, err := IdentityFromEnv(env(map[string]string{EnvNodeID: "N"})); err == nil || !strings.Contains(err.Error(), EnvAssignedID) {
		t.Errorf("identity without agent id: %v", err)
	}
	if n, a, err := IdentityFromEnv(env(map[string]string{EnvNodeID: "N", EnvAssignedID: "A"})); err != nil || n != "N" || a != "A" {
		t.Errorf("identity = %s %s %v", n, a, err)
	}
}

func TestConnectUserPassword(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) {
		o.Username, o.Password = "u", "p"
	}})
	if _, err := Connect(protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}, NatsUserName: "u", NatsUserPassword: "wrong"}, "t"); err == nil {
		t.Error("wrong password accepted")
	}
	nc, err := Connect(protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}, NatsUserName: "u", NatsUserPassword: "p"}, "t")
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
}

// blockingAgent's starts (and replays) wait until released.
type blockingAgent struct {
	*memAgent
	entered chan string
	release chan struct{}
}

func (a *blockingAgent) StartWorkload(id string, req *protocol.AgentStartWorkloadRequest, existing bool) (*protocol.StartWorkloadResponse, error) {
	a.entered <- id
	<-a.release
	return a.memAgent.StartWorkload(id, req, existing)
}

// replayingW0 is a server, a node that hands its nexlet workload W0 to replay, and a
// blockingAgent whose starts wait for releaseOnce (called at the test's end too).
func replayingW0(t *testing.T) (srv *server.Server, nc *nats.Conn, a *blockingAgent, releaseOnce func()) {
	srv = testnats.Start(t, testnats.Options{NoJetStream: true})
	nc = testnats.Connect(t, srv)
	replay := protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "old", Namespace: "ns"}}
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node,
		ExistingState: map[string]protocol.AgentStartWorkloadRequest{"W0": replay}}, make(chan protocol.RegisterAgentRequest, 1))
	a = &blockingAgent{memAgent: newMemAgent(), entered: make(chan string, 4), release: make(chan struct{})}
	released := false
	releaseOnce = func() {
		if !released {
			released = true
			close(a.release)
		}
	}
	t.Cleanup(releaseOnce)
	return srv, nc, a, releaseOnce
}

// TestShutdownAwaitsRequestsAndReplay: a start in flight and a replay still running
// hold Shutdown until they finish (and the start's reply still reaches the node);
// with a shorter shutdown wait, Shutdown gives up after it and says so.
func TestShutdownAwaitsRequestsAndReplay(t *testing.T) {
	for _, tc := range []struct {
		name    string
		wait    time.Duration
		release bool // release the agent while Shutdown waits
	}{
		{"awaited", time.Minute, true},
		{"bounded", 200 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, nc, a, releaseOnce := replayingW0(t)
			r, err := NewRunner(context.Background(), node, a, WithShutdownWait(tc.wait))
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
				t.Fatal(err)
			}
			if id := <-a.entered; id != "W0" {
				t.Fatalf("replay started %s", id)
			}
			start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "w1", Namespace: "ns",
				WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "mem", RunRequest: "{}"}})
			inbox := nats.NewInbox()
			replies, _ := nc.SubscribeSync(inbox)
			_ = nc.Flush()
			if err := nc.PublishRequest(protocol.StartWorkloadSubject(node, agent, "W1"), inbox, start); err != nil {
				t.Fatal(err)
			}
			if id := <-a.entered; id != "W1" {
				t.Fatalf("start entered %s", id)
			}

			shut := make(chan error, 1)
			go func() { shut <- r.Shutdown() }()
			if !tc.release {
				select {
				case err := <-shut:
					if err == nil || !strings.Contains(err.Error(), "still running") {
						t.Fatalf("bounded Shutdown = %v, want it to say requests are still running", err)
					}
				case <-time.After(time.Minute):
					t.Fatal("Shutdown ignored its bound")
				}
				return
			}
			// Once Shutdown refuses new work it is waiting; it must go on waiting while
			// the start and the replay are blocked.
			testkit.Eventually(t, "Shutdown waiting", func() bool { r.workMu.Lock(); defer r.workMu.Unlock(); return r.closing })
			returned := func() bool {
				select {
				case err := <-shut:
					shut <- err
					return true
				default:
					return false
				}
			}
			if testkit.WaitFor(200*time.Millisecond, returned) {
				t.Fatalf("Shutdown returned with a start and a replay in flight: %v", <-shut)
			}
			releaseOnce()
			if err := <-shut; err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
			m, err := replies.NextMsg(10 * time.Second)
			if err != nil {
				t.Fatalf("the start's reply was lost in the shutdown: %v", err)
			}
			var sr protocol.StartWorkloadResponse
			if err := protocol.Decode(m.Data, &sr); err != nil || sr.ID != "W1" {
				t.Errorf("start reply %s: %v", m.Data, err)
			}
			a.mu.Lock()
			defer a.mu.Unlock()
			if !a.replayed["W0"] || a.workloads["W1"].Name != "w1" {
				t.Errorf("replay or start did not finish: %+v", a.workloads)
			}
		})
	}
}

// progressAgent downloads "1000 bytes" on each start, reporting every byte, and
// finishes when the test says (next; a minute at most): the ticker repeats the last
// report meanwhile.
type progressAgent struct {
	*memAgent
	next chan struct{}
}

func (a *progressAgent) StartWorkloadProgress(id string, req *protocol.AgentStartWorkloadRequest, report func(protocol.Progress)) (*protocol.StartWorkloadResponse, error) {
	for done := int64(0); done <= 1000; done++ {
		report(protocol.Progress{Text: "downloading", Done: done, Total: 1000})
	}
	select {
	case <-a.next:
	case <-time.After(time.Minute):
	}
	return a.memAgent.StartWorkload(id, req, false)
}

// TestStartProgressReports: a ProgressStarter's reports reach a node that asked for
// progress: the first and the finished count at once, others thinned to one per
// ProgressEvery, counts never going back, none after the answer; a node that did not
// ask hears only the answer.
func TestStartProgressReports(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, make(chan protocol.RegisterAgentRequest, 1))
	pa := &progressAgent{memAgent: newMemAgent(), next: make(chan struct{}, 1)}
	r, err := NewRunner(context.Background(), node, pa)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "w1", Namespace: "ns",
		WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "mem", RunRequest: "{}"}})
	for _, ask := range []bool{true, false} {
		inbox := nats.NewInbox()
		replies, _ := nc.SubscribeSync(inbox)
		_ = nc.Flush()
		m := &nats.Msg{Subject: protocol.StartWorkloadSubject(node, agent, "P1"), Reply: inbox, Data: start, Header: nats.Header{}}
		if ask {
			m.Header.Set(protocol.HeaderProgress, "100ms")
		} else {
			pa.next <- struct{}{} // no reports to wait for
		}
		if err := nc.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		var counts []int64
		released := false
		for {
			m, err := replies.NextMsg(10 * time.Second)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			if len(m.Data) > 0 {
				break
			}
			done, total, ok := protocol.ParseProgressBytes(m.Header.Get(protocol.HeaderProgressBytes))
			if !ok || total != 1000 || m.Header.Get(protocol.HeaderProgress) != "downloading" {
				t.Fatalf("report %v", m.Header)
			}
			counts = append(counts, done)
			if !released && len(counts) >= 3 && done == 1000 {
				// The finished count and a repeat or one between: the start may end
				// (waited for, not a fixed 300 ms a loaded machine's ticker could miss).
				released = true
				pa.next <- struct{}{}
			}
		}
		if !ask {
			if len(counts) > 0 {
				t.Errorf("a node that did not ask got %d reports", len(counts))
			}
			if m, err := replies.NextMsg(300 * time.Millisecond); err == nil {
				t.Errorf("message after the answer: %v", m.Header)
			}
			continue
		}
		// 0, maybe a few in between, 1000 at once, then the ticker's repeats of 1000.
		if len(counts) < 3 || counts[0] != 0 || counts[len(counts)-1] != 1000 || len(counts) > 20 {
			t.Fatalf("reports %v: want 0 first, 1000 last, thinned", counts)
		}
		for i := 1; i < len(counts); i++ {
			if counts[i] < counts[i-1] {
				t.Fatalf("counts went back: %v", counts)
			}
		}
		if m, err := replies.NextMsg(300 * time.Millisecond); err == nil {
			t.Errorf("report after the answer: %v", m.Header)
		}
		replies.Unsubscribe()
	}
}

// repliedAgent notes each StartReplied, which it holds until the test has the start's
// reply (at most 10 s: a call made before the reply never sees it, and says so).
type repliedAgent struct {
	*memAgent
	seen    chan struct{} // the test got the reply
	replied chan string
}

func (a *repliedAgent) StartReplied(id string) {
	select {
	case <-a.seen:
		a.replied <- id
	case <-time.After(10 * time.Second):
		a.replied <- "before its reply: " + id
	}
}

// TestStartRepliedAfterTheReply: a StartReplier hears of a new start once its reply
// is sent (the native nexlet forwards its workload's first line then), and not of a
// start that failed.
func TestStartRepliedAfterTheReply(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, make(chan protocol.RegisterAgentRequest, 1))
	ra := &repliedAgent{memAgent: newMemAgent(), replied: make(chan string, 4)}
	r, err := NewRunner(context.Background(), node, ra)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	for _, name := range []string{"w1", "fail"} {
		ra.seen = make(chan struct{})
		start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: name, Namespace: "ns",
			WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "mem", RunRequest: "{}"}})
		m, err := nc.Request(protocol.StartWorkloadSubject(node, agent, "P"+name), start, 10*time.Second)
		if err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		close(ra.seen)
		failed := m.Header.Get(protocol.HeaderErrorCode) != ""
		if failed != (name == "fail") {
			t.Fatalf("start %s: reply %q %v", name, m.Data, m.Header)
		}
		select {
		case id := <-ra.replied:
			if failed || id != "P"+name {
				t.Errorf("start %s: StartReplied(%q)", name, id)
			}
		case <-time.After(500 * time.Millisecond):
			if !failed {
				t.Errorf("start %s replied; no StartReplied", name)
			}
		}
	}
}

// TestRunnerAnswersDirect: the runner registers with AnswersDirect and answers the
// node's fan-outs on its own agent id's subjects, naming itself; on the shared subjects
// it answers an upstream node (naming itself) and leaves unanswered a request that says
// the node asked it directly (HeaderAskedDirect), so it neither stops twice nor answers
// where its answer could not be told from another nexlet's.
func TestRunnerAnswersDirect(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	regs := make(chan protocol.RegisterAgentRequest, 1)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	r, err := NewRunner(context.Background(), node, newMemAgent(), WithHeartbeatInterval(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	if reg := <-regs; !reg.AnswersDirect {
		t.Errorf("registration %+v: AnswersDirect not set", reg)
	}
	ask := func(subj, body string, direct bool) (*nats.Msg, error) {
		m := &nats.Msg{Subject: subj, Data: []byte(body)}
		if direct {
			m.Header = nats.Header{protocol.HeaderAskedDirect: {"1"}}
		}
		return nc.RequestMsg(m, 2*time.Second)
	}
	named := func(what string, m *nats.Msg, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if m.Header.Get(protocol.HeaderAgentID) != agent {
			t.Errorf("%s: answer not named %s: %v %s", what, agent, m.Header, m.Data)
		}
	}
	start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "w1", Namespace: "ns",
		Tags: map[string]string{}, WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "mem", RunRequest: "{}"}})
	for _, id := range []string{"W1", "W2"} {
		if _, err := ask(protocol.StartWorkloadSubject(node, agent, id), string(start), false); err != nil {
			t.Fatal(err)
		}
	}
	m, err := ask(protocol.QueryWorkloadsAgentSubject(node, agent), `{"namespace":"ns","filter":[]}`, false)
	named("direct query", m, err)
	m, err = ask(protocol.QueryWorkloadsSubject(node), `{"namespace":"ns","filter":[]}`, false)
	named("shared query", m, err)
	m, err = ask(protocol.GetWorkloadAgentSubject(node, agent, "W1"), `{}`, false)
	named("direct get", m, err)
	m, err = ask(protocol.GetWorkloadSubject(node, "W1"), `{}`, false)
	named("shared get", m, err)
	for _, subj := range []string{protocol.QueryWorkloadsSubject(node), protocol.GetWorkloadSubject(node, "W1"), protocol.StopWorkloadSubject(node, "W1")} {
		if m, err := ask(subj, `{"namespace":"ns","filter":[]}`, true); !errors.Is(err, nats.ErrTimeout) {
			t.Errorf("%s with %s: answered (%v), want silence", subj, protocol.HeaderAskedDirect, m)
		}
	}
	m, err = ask(protocol.StopWorkloadAgentSubject(node, agent, "W1"), `{"namespace":"ns"}`, false)
	named("direct stop", m, err)
	var stop protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &stop); err != nil || !stop.Stopped {
		t.Errorf("direct stop of W1: %s %v (the shared one with %s must not have stopped it)", m.Data, err, protocol.HeaderAskedDirect)
	}
	m, err = ask(protocol.StopWorkloadSubject(node, "W2"), `{"namespace":"ns"}`, false)
	named("shared stop", m, err)
	m, err = ask(protocol.StopWorkloadSubject(node, "W2"), `{"namespace":"ns"}`, false)
	named("shared stop of a stopped workload", m, err)
}

// TestStopWhileReplaying: a stop of a workload handed to the nexlet to replay, asked
// before its replay is through (a list shows it, state starting), waits for that
// replay and then stops it. Before, the agent did not hold it yet: the stop answered
// "workload not found", and the replay then ran it on.
func TestStopWhileReplaying(t *testing.T) {
	srv, nc, a, releaseOnce := replayingW0(t)
	r, err := NewRunner(context.Background(), node, a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	if id := <-a.entered; id != "W0" {
		t.Fatalf("replay started %s", id)
	}
	inbox := nats.NewInbox()
	replies, _ := nc.SubscribeSync(inbox)
	body, _ := json.Marshal(protocol.StopWorkloadRequest{Namespace: "ns"})
	if err := nc.PublishRequest(protocol.StopWorkloadAgentSubject(node, agent, "W0"), inbox, body); err != nil {
		t.Fatal(err)
	}
	if m, err := replies.NextMsg(300 * time.Millisecond); err == nil {
		t.Errorf("stop answered while its workload's replay was still running: %v %s", m.Header, m.Data)
	}
	releaseOnce()
	m, err := replies.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no stop answer once the replay was through: %v", err)
	}
	var resp protocol.StopWorkloadResponse
	if err := protocol.Decode(m.Data, &resp); err != nil || !resp.Stopped {
		t.Errorf("stop answer %v %s (%v), want stopped", m.Header, m.Data, err)
	}
	testkit.Eventually(t, "the replay through", func() bool { a.mu.Lock(); defer a.mu.Unlock(); return a.replayed["W0"] })
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.workloads["W0"]; ok {
		t.Errorf("W0 runs after its stop was asked: the replay started it")
	}
}

// TestRunnerListInParts: a nexlet holding a list larger than one message the server
// takes (max_payload 16 KB here) answers a QUERYWORKLOADS that takes parts
// (HeaderListParts) in several messages, each within max_payload, numbered i/n, whose
// rows are every workload once; asked without it (upstream's node, an older nexd), it
// answers an error naming max_payload. Before, both got nothing: the publish failed
// ("maximum payload exceeded") and the node counted the nexlet as silent.
func TestRunnerListInParts(t *testing.T) {
	const maxPayload = 16 << 10
	srv := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) { o.MaxPayload = maxPayload }})
	nc := testnats.Connect(t, srv)
	regs := make(chan protocol.RegisterAgentRequest, 1)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	a := newMemAgent()
	const count = 500
	for i := range count {
		a.workloads[fmt.Sprintf("W%03d", i)] = protocol.StartWorkloadRequest{Name: fmt.Sprintf("service-%03d", i), Namespace: "ns"}
	}
	r, err := NewRunner(context.Background(), node, a, WithHeartbeatInterval(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	<-regs

	inbox := nc.NewInbox()
	replies, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(h nats.Header) {
		t.Helper()
		if err := nc.PublishMsg(&nats.Msg{Subject: protocol.QueryWorkloadsAgentSubject(node, agent), Reply: inbox, Header: h,
			Data: []byte(`{"namespace":"system","filter":[]}`)}); err != nil {
			t.Fatal(err)
		}
	}
	ask(nats.Header{protocol.HeaderListParts: {"1"}})
	seen := map[string]int{}
	parts := 0
	for {
		m, err := replies.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d parts: %v", parts, err)
		}
		parts++
		if size := len(m.Data); size > maxPayload {
			t.Errorf("part %d: %d bytes, over max_payload", parts, size)
		}
		want := fmt.Sprintf("%d/", parts)
		h := m.Header.Get(protocol.HeaderListPart)
		if !strings.HasPrefix(h, want) || m.Header.Get(protocol.HeaderAgentID) != agent {
			t.Fatalf("part %d: headers %v, want %s %s… and the nexlet's id", parts, m.Header, protocol.HeaderListPart, want)
		}
		var rows []protocol.WorkloadSummary
		if err := json.Unmarshal(m.Data, &rows); err != nil {
			t.Fatalf("part %d: %v", parts, err)
		}
		for _, w := range rows {
			seen[w.ID]++
		}
		if h == fmt.Sprintf("%d/%d", parts, parts) {
			break
		}
	}
	if parts < 2 {
		t.Errorf("the list came in %d part(s): it fits one message, so this tests nothing", parts)
	}
	if len(seen) != count {
		t.Errorf("the parts list %d workloads, want %d", len(seen), count)
	}
	for id, k := range seen {
		if k != 1 {
			t.Errorf("workload %s listed %d times", id, k)
		}
	}

	ask(nil)
	m, err := replies.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("asked without %s: %v", protocol.HeaderListParts, err)
	}
	if m.Header.Get(protocol.HeaderErrorCode) == "" || !strings.Contains(m.Header.Get(protocol.HeaderError), "max_payload") {
		t.Errorf("asked without %s: answer %v %.80s, want an error naming max_payload", protocol.HeaderListParts, m.Header, m.Data)
	}
}

// TestEndpointsBeforeFirstHeartbeat: a node asks a nexlet the moment it has the
// nexlet's first heartbeat (its lists, its bids: node.awaitServing, WaitServing), so
// the heartbeat must reach it only once the server has the endpoints' subscriptions.
// Run no longer waits for a flush of them before the heartbeat: the heartbeat goes out
// behind them on the same connection, which the server reads in order. Every start,
// asked on the first heartbeat's arrival, answers (no "no responders").
func TestEndpointsBeforeFirstHeartbeat(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	regs := make(chan protocol.RegisterAgentRequest, 1)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	const starts = 20
	for i := range starts {
		answered := make(chan error, 1)
		sub, err := nc.Subscribe(protocol.AgentHeartbeatSubject(node, agent), func(*nats.Msg) {
			for _, subj := range []string{protocol.PingAgentSubject(node, agent), protocol.QueryWorkloadsAgentSubject(node, agent)} {
				if _, err := nc.Request(subj, []byte(`{"namespace":"system"}`), 10*time.Second); err != nil {
					answered <- fmt.Errorf("%s: %w", subj, err)
					return
				}
			}
			answered <- nil
		})
		if err != nil {
			t.Fatal(err)
		}
		sub.AutoUnsubscribe(1)
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		r, err := NewRunner(context.Background(), node, newMemAgent())
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
			t.Fatal(err)
		}
		<-regs
		select {
		case err := <-answered:
			if err != nil {
				t.Errorf("start %d: asked on its first heartbeat: %v", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("start %d: no first heartbeat", i)
		}
		if err := r.Shutdown(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStartRegistersAgainWhileStateUnreadable: a node that cannot read its state
// refuses the registration (503, protocol.ErrTextStateUnreadable); the start registers
// again until it is accepted, and replays what that acceptance hands it, a patient start
// as one that is not (a configured nexlet that ended on the refusal would be restarted
// only up to its supervisor's restart limit). Before, the refusal ended the start (nexd's
// native nexlet then exited).
func TestStartRegistersAgainWhileStateUnreadable(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	var asked atomic.Int32
	refusals := int32(2)
	_, err := nc.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) {
		if asked.Add(1) <= refusals {
			r := nats.NewMsg(m.Reply)
			r.Header.Set(protocol.HeaderErrorCode, "503")
			r.Header.Set(protocol.HeaderError, protocol.ErrTextStateUnreadable)
			r.Data = []byte(`{"error":"the node's state store (JetStream) cannot be read"}`)
			_ = m.RespondMsg(r)
			return
		}
		b, _ := json.Marshal(protocol.RegisterAgentResponse{Success: true, NodeID: node,
			ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}},
			ExistingState: map[string]protocol.AgentStartWorkloadRequest{
				"STORED": {Request: protocol.StartWorkloadRequest{Name: "stored", Namespace: "ns", WorkloadType: "mem"}}}})
		_ = m.Respond(b)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	creds := protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}
	for _, patient := range []bool{false, true} {
		asked.Store(0)
		a := newMemAgent()
		var opts []Option
		if patient {
			opts = append(opts, WithPatientStart())
		}
		r, _ := NewRunner(t.Context(), node, a, opts...)
		if err := r.Run(agent, creds); err != nil {
			t.Fatalf("Run (patient %v) = %v", patient, err)
		}
		if got := asked.Load(); got != refusals+1 {
			t.Errorf("patient %v: %d registrations sent, want %d (refused %d times, then accepted)", patient, got, refusals+1, refusals)
		}
		testkit.Eventually(t, "the accepted registration's workload replayed", func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			return a.replayed["STORED"]
		})
		_ = r.Shutdown()
	}
}
