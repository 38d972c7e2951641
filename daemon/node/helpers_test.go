package node

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// testMinter hands out connection data naming the test server; can=false plays a
// node without an issuer.
type testMinter struct {
	url string
	can bool
}

func (m testMinter) cd(name string) protocol.NatsConnectionData {
	return protocol.NatsConnectionData{ConnName: name, NatsServers: []string{m.url}}
}
func (m testMinter) MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error) {
	return m.cd("register-" + agentID), nil
}
func (m testMinter) MintAgent(agentID, nodeID string, _ bool) (protocol.NatsConnectionData, error) {
	return m.cd("agent-" + agentID), nil
}
func (m testMinter) MintWorkload(ns, id string) (protocol.NatsConnectionData, error) {
	return m.cd("workload-" + ns + "-" + id), nil
}
func (m testMinter) WorkloadNamespaceFits(string) bool { return true }
func (m testMinter) RenewWorkload(ns, id string) (protocol.NatsConnectionData, error) {
	return m.MintWorkload(ns, id)
}
func (m testMinter) RenewAgent(string, string, string, bool) (protocol.NatsConnectionData, error) {
	return protocol.NatsConnectionData{}, mint.ErrRenewalUnsupported
}
func (m testMinter) RevokeAgentBefore(context.Context, string, string) error {
	return mint.ErrRevocationUnsupported
}
func (m testMinter) RevokeSuperseded(context.Context, string) error {
	return mint.ErrRevocationUnsupported
}
func (m testMinter) CanMint() bool        { return m.can }
func (m testMinter) PrivateInboxes() bool { return false }

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("NODE_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

type fixture struct {
	t      testing.TB
	srv    *server.Server
	client *nats.Conn
	nodes  []*Node
	stores []*MemStore
}

// newFixture starts count nodes, each with its own connection and keys, on one server.
func newFixture(t testing.TB, count int, tweak func(i int, o *Options)) *fixture {
	t.Helper()
	return newFixtureOn(t, testnats.Start(t, testnats.Options{NoJetStream: true}), count, tweak)
}

func newFixtureOn(t testing.TB, srv *server.Server, count int, tweak func(i int, o *Options)) *fixture {
	t.Helper()
	f := &fixture{t: t, srv: srv, client: testnats.Connect(t, srv)}
	for i := range count {
		kp, err := nkeys.CreateServer()
		if err != nil {
			t.Fatal(err)
		}
		xk, err := nkeys.CreateCurveKeys()
		if err != nil {
			t.Fatal(err)
		}
		st := NewMemStore()
		o := Options{
			NC:                testnats.Connect(t, srv),
			NodeKey:           kp,
			XKey:              xk,
			Name:              fmt.Sprintf("node-%d", i),
			Nexus:             "testnexus",
			Version:           "0.1.0",
			Minter:            testMinter{url: srv.ClientURL(), can: true},
			Store:             st,
			Logger:            testLogger(t),
			HeartbeatInterval: 200 * time.Millisecond,
			HealthTick:        50 * time.Millisecond,
			FanoutTimeout:     2 * time.Second,
			CloneTimeout:      time.Second,
		}
		if tweak != nil {
			tweak(i, &o)
		}
		n, err := New(o)
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		if err := n.Start(context.Background()); err != nil {
			t.Fatalf("node %d start: %v", i, err)
		}
		n.SetState(protocol.NodeRunning)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := n.Stop(ctx); err != nil {
				t.Errorf("stop node %d: %v", i, err)
			}
		})
		f.nodes = append(f.nodes, n)
		f.stores = append(f.stores, st)
	}
	return f
}

// collect sends one request and gathers replies until want arrived (then waits
// quiet more for extras) or timeout passed.
func collect(t testing.TB, nc *nats.Conn, subject string, body []byte, want int, timeout, quiet time.Duration) []*nats.Msg {
	t.Helper()
	inbox := nc.NewInbox()
	ch := make(chan *nats.Msg, 64)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subject, inbox, body); err != nil {
		t.Fatal(err)
	}
	var out []*nats.Msg
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		var wait <-chan time.Time
		if len(out) >= want {
			wait = time.After(quiet)
		}
		select {
		case m := <-ch:
			if isNoResponders(m) {
				return out
			}
			out = append(out, m)
		case <-wait:
			return out
		case <-deadline.C:
			return out
		}
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// js is for goroutines that must not call t.Helper (fuzz targets forbid f.Helper there).
func js(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func request(t testing.TB, nc *nats.Conn, subject string, v any) *nats.Msg {
	t.Helper()
	var body []byte
	switch b := v.(type) {
	case []byte:
		body = b
	case string:
		body = []byte(b)
	default:
		body = mustJSON(t, v)
	}
	m, err := nc.Request(subject, body, 10*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return m
}

// errorReply decodes a node's micro error reply, failing when m is not one.
func errorReply(t testing.TB, m *nats.Msg) (code string, body protocol.ErrorBody) {
	t.Helper()
	code = m.Header.Get(protocol.HeaderErrorCode)
	if code == "" {
		t.Fatalf("expected an error reply, got %q", m.Data)
	}
	if err := json.Unmarshal(m.Data, &body); err != nil || body.ErrorID == "" || body.Error == "" {
		t.Fatalf("error body %q: %v", m.Data, err)
	}
	return code, body
}

const testSchema = `{"type":"object","properties":{"cmd":{"type":"string"},"n":{"type":"integer"}},"required":["cmd"],"additionalProperties":false}`

// fakeAgent speaks the remote side of the agent plane over raw NATS: a test double
// for a nexlet, which the nexlet SDK replaces in production.
type fakeAgent struct {
	t          testing.TB
	nc         *nats.Conn
	nodeID, id string
	req        protocol.RegisterAgentRequest
	hbEvery    time.Duration
	key        nkeys.KeyPair // signs the registration when set
	// reconnect, when set, gives the connection the fake serves on once registered:
	// the user the node minted for it (a real nexlet's switch from its registration user).
	reconnect func(protocol.NatsConnectionData) *nats.Conn
	// mute: no answer to QUERYWORKLOADS, STOPWORKLOAD or GETWORKLOAD (a hung nexlet).
	mute atomic.Bool
	// noList: no answer to QUERYWORKLOADS only (a nexlet busy listing; its PING answers).
	noList atomic.Bool

	mu        sync.Mutex
	workloads map[string]protocol.StartWorkloadRequest
	creds     map[string]protocol.NatsConnectionData
	hbState   string
	failStart string
	// failStop: STOPWORKLOAD is answered not stopped, with this message (a nexlet that
	// could not stop the workload); the workload runs on.
	failStop string
	// stopsUnknownAsDone: a stop of a workload it does not hold in the request's
	// namespace is answered stopped, the workload left running: a version of upstream's
	// native nexlet takes such a stop for a no-op (nil), which upstream's SDK answers
	// as stopped.
	stopsUnknownAsDone bool
	stopsAskedOf       map[string]int // STOPWORKLOAD requests received, by workload id
	// clonesAnyNamespace: GETWORKLOAD is answered with the workload's start request
	// in the request's namespace: a nexlet that keeps its workloads by id and leaves
	// the namespace to its node.
	clonesAnyNamespace bool
	clonesAskedOf      map[string]int // GETWORKLOAD requests received, by workload id
	// listsAll: QUERYWORKLOADS is answered with every workload it holds, whatever the
	// request's namespace, and without their namespace (optional in upstream's
	// WorkloadSummary): a nexlet that leaves the namespace to its node.
	listsAll bool
	// extraRows are listed besides its workloads, in every answer to QUERYWORKLOADS.
	extraRows []protocol.WorkloadSummary
	// listErr: QUERYWORKLOADS is answered with this error (code 100), as upstream's SDK
	// answers a failed QueryWorkloads.
	listErr string
	// endFirst plays a job so quick that its WORKLOADSTOPPED event is published
	// before the reply to STARTWORKLOAD.
	endFirst  bool
	lameducks int
	starts    int // STARTWORKLOAD requests received
	// startDelay holds the reply to STARTWORKLOAD this long (the workload runs from
	// the start); with progress the fake reports progress as the node asks.
	startDelay time.Duration
	progress   bool
	// heldUntilAnswer: with startDelay, the workload is listed only from the answer on
	// (a nexlet that holds a workload once it started it, not while it starts).
	heldUntilAnswer bool
	// answerGate, when set, holds the answer to STARTWORKLOAD until it is closed (the
	// workload runs from the start).
	answerGate chan struct{}
	// stopDelay holds the answer to a stop this long after the workload left the
	// fake's list (a nexlet that drops a workload, then waits out its grace).
	stopDelay time.Duration
	// holdFirstList holds the answer to the first QUERYWORKLOADS until the second one
	// comes (a nexlet busy replaying as the node lists: its answer lands after the
	// node's round ended, whatever the host's pace), or until the test ends.
	holdFirstList bool
	secondList    chan struct{} // closed by the second QUERYWORKLOADS
	testEnded     chan struct{} // closed at the test's end, releasing a held answer
	held          sync.WaitGroup
	holdOnce      sync.Once
	lists         int
	stopHB        chan struct{}
	hbDone        chan struct{}
	resp          protocol.RegisterAgentResponse
}

func newFakeAgent(t testing.TB, srv *server.Server, nodeID, id, name, typ string) *fakeAgent {
	return newFakeAgentOn(t, testnats.Connect(t, srv), nodeID, id, name, typ)
}

// newFakeAgentOn is newFakeAgent registering on nc.
func newFakeAgentOn(t testing.TB, nc *nats.Conn, nodeID, id, name, typ string) *fakeAgent {
	xk, _ := nkeys.CreateCurveKeys()
	xpub, _ := xk.PublicKey()
	return &fakeAgent{
		t: t, nc: nc, nodeID: nodeID, id: id, hbEvery: 100 * time.Millisecond,
		req: protocol.RegisterAgentRequest{
			Description: "fake", Name: name, PublicXKey: xpub, RegisterType: typ,
			StartRequestSchema:  testSchema,
			SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleService, protocol.LifecycleJob},
			Version:             "1.0.0",
			AnswersDirect:       true,
		},
		workloads:  map[string]protocol.StartWorkloadRequest{},
		creds:      map[string]protocol.NatsConnectionData{},
		hbState:    "running",
		secondList: make(chan struct{}),
		testEnded:  make(chan struct{}),
	}
}

// register sends REGISTER and returns the reply; on success it serves the agent
// plane and heartbeats.
func (a *fakeAgent) register() *nats.Msg {
	a.t.Helper()
	m := a.send(protocol.RegisterSubject(a.nodeID, a.id), mustJSON(a.t, a.req))
	if m.Header.Get(protocol.HeaderErrorCode) != "" {
		return m
	}
	if err := protocol.Decode(m.Data, &a.resp); err != nil {
		a.t.Fatalf("register reply: %v", err)
	}
	a.mu.Lock()
	for id, w := range a.resp.ExistingState {
		a.workloads[id] = w.Request
		a.creds[id] = w.WorkloadCreds
	}
	a.mu.Unlock()
	if a.reconnect != nil {
		a.stopHeartbeats() // of an earlier registration: they publish on a.nc
		a.nc = a.reconnect(a.resp.ConnectionData)
	}
	a.serve()
	return m
}

// signingTime is a registration's time of signing as a nexlet sends it: now.
func signingTime() string { return strconv.FormatInt(time.Now().UnixNano(), 10) }

// signAt signs m (subject and data) with kp as a nexlet signs a registration or a
// renewal, at the time at.
func signAt(t testing.TB, m *nats.Msg, kp nkeys.KeyPair, at time.Time) {
	t.Helper()
	pub, _ := kp.PublicKey()
	ts := strconv.FormatInt(at.UnixNano(), 10)
	sig, err := kp.Sign(protocol.RegistrationPayload(m.Subject, ts, m.Data))
	if err != nil {
		t.Fatal(err)
	}
	m.Header.Set(protocol.HeaderRegistrationKey, pub)
	m.Header.Set(protocol.HeaderRegistrationTime, ts)
	m.Header.Set(protocol.HeaderRegistrationSig, base64.StdEncoding.EncodeToString(sig))
}

// send sends a registration, signed with a.key when set, and returns the reply.
func (a *fakeAgent) send(subject string, body []byte) *nats.Msg {
	a.t.Helper()
	msg := nats.NewMsg(subject)
	msg.Data = body
	if a.key != nil {
		signAt(a.t, msg, a.key, time.Now())
	}
	m, err := a.nc.RequestMsg(msg, 10*time.Second)
	if err != nil {
		a.t.Fatalf("register %s: %v", subject, err)
	}
	return m
}

func (a *fakeAgent) mustRegister() {
	a.t.Helper()
	m := a.register()
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
		a.t.Fatalf("register %s: %s %s", a.id, code, m.Data)
	}
}

func respondErr(m *nats.Msg, code, desc string, body []byte) {
	_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderErrorCode: {code}, protocol.HeaderError: {desc}}, Data: body})
}

func (a *fakeAgent) serve() {
	p := protocol.AgentPrefix(a.nodeID)
	sub := func(subj string, h nats.MsgHandler) {
		if _, err := a.nc.QueueSubscribe(subj, a.id, h); err != nil {
			a.t.Fatal(err)
		}
	}
	// As nexd's nexlets do: the shared subjects (an upstream node asks there) and, when
	// registered with AnswersDirect, those of its own agent id (a nexd node asks there).
	both := func(suffix string, h nats.MsgHandler) {
		sub(p+suffix, func(m *nats.Msg) {
			if a.req.AnswersDirect && m.Header.Get(protocol.HeaderAskedDirect) != "" {
				return // asked on its own subject
			}
			h(m)
		})
		if a.req.AnswersDirect {
			sub(p+"."+a.id+suffix, h)
		}
	}
	sub(p+"."+a.id+".STARTWORKLOAD.*", func(m *nats.Msg) {
		wid := protocol.LastToken(m.Subject)
		var req protocol.AgentStartWorkloadRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			respondErr(m, "100", err.Error(), nil)
			return
		}
		a.mu.Lock()
		a.starts++
		fail := a.failStart
		if fail == "" && !a.endFirst && !(a.heldUntilAnswer && a.startDelay > 0) {
			a.workloads[wid] = req.Request
			a.creds[wid] = req.WorkloadCreds
		}
		if a.endFirst {
			a.emitStopped(wid, req.Request.Namespace)
			_ = a.nc.Flush()
		}
		a.mu.Unlock()
		if fail != "" {
			respondErr(m, "100", fail, js(protocol.StartWorkloadResponse{ID: wid, Name: req.Request.Name}))
			return
		}
		a.mu.Lock()
		delay, progress, gate := a.startDelay, a.progress, a.answerGate
		a.mu.Unlock()
		if gate != nil {
			go func() {
				<-gate
				_ = m.Respond(js(protocol.StartWorkloadResponse{ID: wid, Name: req.Request.Name}))
			}()
			return
		}
		if delay > 0 {
			// Off the subscription's goroutine, so a stop can come in meanwhile.
			go func() {
				every, _ := time.ParseDuration(m.Header.Get(protocol.HeaderProgress))
				end := time.After(delay)
				var tick <-chan time.Time
				if progress && every > 0 {
					t := time.NewTicker(every)
					defer t.Stop()
					tick = t.C
				}
				for done := int64(1); ; done++ {
					select {
					case <-end:
						a.mu.Lock()
						if a.heldUntilAnswer {
							a.workloads[wid] = req.Request
							a.creds[wid] = req.WorkloadCreds
						}
						a.mu.Unlock()
						_ = m.Respond(js(protocol.StartWorkloadResponse{ID: wid, Name: req.Request.Name}))
						return
					case <-tick:
						// A download's byte count, as the native nexlet reports it.
						_ = a.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: nats.Header{protocol.HeaderProgress: {"starting"},
							protocol.HeaderProgressBytes: {protocol.FormatProgressBytes(done, 1000)}}})
					}
				}
			}()
			return
		}
		_ = m.Respond(js(protocol.StartWorkloadResponse{ID: wid, Name: req.Request.Name}))
	})
	both(".STOPWORKLOAD.*", func(m *nats.Msg) {
		if a.mute.Load() {
			return
		}
		wid := protocol.LastToken(m.Subject)
		var req protocol.StopWorkloadRequest
		_ = protocol.Decode(m.Data, &req)
		a.mu.Lock()
		if a.stopsAskedOf == nil {
			a.stopsAskedOf = map[string]int{}
		}
		a.stopsAskedOf[wid]++
		w, ok := a.workloads[wid]
		ok = ok && (w.Namespace == req.Namespace)
		if !ok && a.stopsUnknownAsDone {
			a.mu.Unlock()
			_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderAgentID: {a.id}},
				Data: js(protocol.StopWorkloadResponse{ID: wid, Stopped: true, WorkloadType: a.req.RegisterType})})
			return
		}
		failStop := a.failStop
		if ok && failStop == "" {
			delete(a.workloads, wid)
		}
		delay := a.stopDelay
		a.mu.Unlock()
		if ok && req.RecordAck && a.req.StopAck {
			// Recorded (as the native nexlet writes its stop record), before the grace.
			_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderStopRecorded: {a.id}}})
		}
		if ok {
			time.Sleep(delay)
		}
		// Named, as nexd's nexlets name their stop and clone answers.
		self := nats.Header{protocol.HeaderAgentID: {a.id}}
		if ok && failStop != "" {
			_ = m.RespondMsg(&nats.Msg{Header: self, Data: js(protocol.StopWorkloadResponse{ID: wid, Message: failStop, WorkloadType: a.req.RegisterType})})
			return
		}
		if !ok {
			self.Set(protocol.HeaderErrorCode, "100")
			self.Set(protocol.HeaderError, "workload not found")
			_ = m.RespondMsg(&nats.Msg{Header: self, Data: js(protocol.StopWorkloadResponse{ID: wid, Message: "workload not found", WorkloadType: a.req.RegisterType})})
			return
		}
		_ = m.RespondMsg(&nats.Msg{Header: self, Data: js(protocol.StopWorkloadResponse{ID: wid, Stopped: true, WorkloadType: a.req.RegisterType})})
		a.emitStopped(wid, w.Namespace)
	})
	both(".GETWORKLOAD.*", func(m *nats.Msg) {
		if a.mute.Load() {
			return
		}
		wid := protocol.LastToken(m.Subject)
		a.mu.Lock()
		if a.clonesAskedOf == nil {
			a.clonesAskedOf = map[string]int{}
		}
		a.clonesAskedOf[wid]++
		w, ok := a.workloads[wid]
		if a.clonesAnyNamespace {
			var req protocol.CloneWorkloadRequest
			_ = protocol.Decode(m.Data, &req)
			w.Namespace = req.Namespace
		}
		a.mu.Unlock()
		if ok { // like upstream: any namespace, silent when absent
			_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderAgentID: {a.id}}, Data: js(w)})
		}
	})
	both(".QUERYWORKLOADS", func(m *nats.Msg) {
		if a.mute.Load() || a.noList.Load() {
			return
		}
		a.mu.Lock()
		listErr := a.listErr
		a.mu.Unlock()
		if listErr != "" {
			respondErr(m, "100", listErr, nil)
			return
		}
		var req protocol.AgentListWorkloadsRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			respondErr(m, "100", err.Error(), nil)
			return
		}
		a.mu.Lock()
		a.lists++
		hold := a.holdFirstList && a.lists == 1
		if a.holdFirstList && a.lists == 2 {
			close(a.secondList)
		}
		a.mu.Unlock()
		if hold {
			a.held.Go(func() {
				select {
				case <-a.secondList:
				case <-a.testEnded:
				}
				a.answerList(m, req)
			})
			return
		}
		a.answerList(m, req)
	})
	// PingAgent on its own subject, as both SDKs serve it: its summary, with how many
	// workloads it holds.
	sub(p+"."+a.id+".PING", func(m *nats.Msg) {
		if a.mute.Load() {
			return
		}
		a.mu.Lock()
		s := protocol.AgentSummary{Name: a.req.Name, Type: a.req.RegisterType, State: a.hbState, Version: a.req.Version,
			SupportedLifecycles: "service,job", WorkloadCount: len(a.workloads), StartTime: time.Now().UTC()}
		a.mu.Unlock()
		_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderAgentID: {a.id}}, Data: js(s)})
	})
	sub(p+".SETLAMEDUCK", func(m *nats.Msg) {
		a.mu.Lock()
		a.lameducks++
		a.mu.Unlock()
		_ = m.RespondMsg(&nats.Msg{Header: nats.Header{"agentId": {a.id}}, Data: js(protocol.LameduckResponse{Success: true})})
	})
	if a.holdFirstList {
		a.holdOnce.Do(func() { // once, though registered again
			a.t.Cleanup(func() {
				close(a.testEnded)
				a.held.Wait()
			})
		})
	}
	// The node asks on its own connection: the server must have the subscriptions
	// before anyone can find this agent.
	if err := a.nc.Flush(); err != nil {
		a.t.Fatal(err)
	}
	a.startHeartbeats()
}

// answerList answers m, a QUERYWORKLOADS asked as req, with the workloads it holds.
func (a *fakeAgent) answerList(m *nats.Msg, req protocol.AgentListWorkloadsRequest) {
	out := []protocol.WorkloadSummary{}
	a.mu.Lock()
	for id, w := range a.workloads {
		if req.Namespace != protocol.SystemNamespace && w.Namespace != req.Namespace && !a.listsAll {
			continue
		}
		if len(req.Filter) > 0 && !slices.Contains(req.Filter, id) && !slices.Contains(req.Filter, w.Name) {
			continue
		}
		ns := &w.Namespace
		if a.listsAll {
			ns = nil
		}
		out = append(out, protocol.WorkloadSummary{ID: id, Name: w.Name, Namespace: ns, Runtime: "--",
			StartTime: time.Now().UTC().Format(time.RFC3339), Tags: w.Tags, WorkloadLifecycle: string(w.WorkloadLifecycle),
			WorkloadState: protocol.WorkloadRunning, WorkloadType: w.WorkloadType})
	}
	out = append(out, a.extraRows...)
	a.mu.Unlock()
	// Named, as nexd's nexlets name their list answers.
	_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderAgentID: {a.id}}, Data: js(out)})
}

func (a *fakeAgent) startHeartbeats() {
	// A registration again (register called once more) replaces the heartbeats: the
	// goroutine keeps its own channels, which the next start replaces.
	a.stopHeartbeats()
	stop, done := make(chan struct{}), make(chan struct{})
	a.stopHB, a.hbDone = stop, done
	go func() {
		defer close(done)
		t := time.NewTicker(a.hbEvery)
		defer t.Stop()
		for {
			a.mu.Lock()
			hb := protocol.AgentHeartbeat{Data: "{}", Summary: protocol.AgentSummary{
				Name: a.req.Name, Type: a.req.RegisterType, State: a.hbState, Version: a.req.Version,
				SupportedLifecycles: "service,job", WorkloadCount: len(a.workloads), StartTime: time.Now().UTC(),
			}}
			a.mu.Unlock()
			b, _ := json.Marshal(hb)
			_ = a.nc.Publish(protocol.AgentHeartbeatSubject(a.nodeID, a.id), b)
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	a.t.Cleanup(a.stopHeartbeats)
}

func (a *fakeAgent) stopHeartbeats() {
	if a.stopHB == nil {
		return
	}
	select {
	case <-a.stopHB:
	default:
		close(a.stopHB)
	}
	<-a.hbDone
}

func (a *fakeAgent) emitStopped(wid, ns string) {
	_ = a.nc.Publish(protocol.EventSubject(ns, protocol.EventWorkloadStopped),
		js(protocol.WorkloadStoppedEvent{ID: wid, Namespace: ns, WorkloadType: a.req.RegisterType}))
}

// finish plays a job ending on its own.
func (a *fakeAgent) finish(wid string) {
	a.mu.Lock()
	w, ok := a.workloads[wid]
	delete(a.workloads, wid)
	a.mu.Unlock()
	if ok {
		a.emitStopped(wid, w.Namespace)
	}
}

// kill plays the nexlet process exiting: no heartbeats, no subscriptions.
func (a *fakeAgent) kill() {
	a.stopHeartbeats()
	a.nc.Close()
}

func (a *fakeAgent) workloadCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.workloads)
}

// healthyAgent registers a fake agent on n and waits until n counts it healthy.
func (f *fixture) healthyAgent(n *Node, id, name, typ string, tweak func(*fakeAgent)) *fakeAgent {
	f.t.Helper()
	n.ExpectAgent(id, name)
	a := newFakeAgent(f.t, f.srv, n.ID(), id, name, typ)
	if tweak != nil {
		tweak(a)
	}
	a.mustRegister()
	waitHealthy(f.t, n, id)
	return a
}

// waitHealthy waits until n counts nexlet id healthy.
func waitHealthy(t testing.TB, n *Node, id string) {
	t.Helper()
	testkit.Eventually(t, "agent "+id+" healthy", func() bool {
		for _, ai := range n.Agents() {
			if ai.ID == id && ai.Health == protocol.HealthHealthy {
				return true
			}
		}
		return false
	})
}

func startReq(ns, name string, run string) protocol.StartWorkloadRequest {
	return protocol.StartWorkloadRequest{
		Description: "test", Name: name, Namespace: ns, RunRequest: run, Tags: map[string]string{},
		WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "native",
	}
}

// auction returns the bids for an auction in ns, waiting for want bids.
func (f *fixture) auction(ns string, req protocol.AuctionRequest, want int) []protocol.AuctionResponse {
	f.t.Helper()
	if req.AuctionID == "" {
		req.AuctionID = "auction-1"
	}
	if req.Tags == nil {
		req.Tags = map[string]string{}
	}
	msgs := collect(f.t, f.client, protocol.AuctionSubject(ns), mustJSON(f.t, req), want, 10*time.Second, 300*time.Millisecond)
	var out []protocol.AuctionResponse
	for _, m := range msgs {
		var b protocol.AuctionResponse
		if err := protocol.Decode(m.Data, &b); err != nil {
			f.t.Fatalf("bid %q: %v", m.Data, err)
		}
		out = append(out, b)
	}
	return out
}
