// Command upnexlet is an e2e test double for a nexlet on upstream Nex's SDK, written
// from upstream's wire (not its code): it registers unsigned with the registration
// user nexd hands it (NEX_AGENT_*), answers on the shared agent subjects and its own
// STARTWORKLOAD and PING, heartbeats, and says a workload ended only with
// WORKLOADSTOPPED on $NEX.FEED (no WORKLOADENDED). A job "runs" for 200 ms. It starts
// what the registration hands it to replay, as the SDK does. It appends "pid <pid>" at
// its start and "start <workload id>" at each start to the file its first argument
// names.
package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "upnexlet:", err)
		os.Exit(1)
	}
}

type nexlet struct {
	nc        *nats.Conn
	node, id  string
	log       *os.File
	mu        sync.Mutex
	workloads map[string]protocol.StartWorkloadRequest
}

func run() error {
	if len(os.Args) < 2 {
		return fmt.Errorf("usage: upnexlet <log file>")
	}
	log, err := os.OpenFile(os.Args[1], os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	fmt.Fprintf(log, "pid %d\n", os.Getpid())
	jwt, err := base64.StdEncoding.DecodeString(os.Getenv("NEX_AGENT_NATS_B64_JWT"))
	if err != nil {
		return fmt.Errorf("NEX_AGENT_NATS_B64_JWT: %w", err)
	}
	servers, node, id := os.Getenv("NEX_AGENT_NATS_SERVERS"), os.Getenv("NEX_AGENT_NODE_ID"), os.Getenv("NEX_AGENT_ASSIGNED_ID")
	rc, err := nats.Connect(servers, nats.UserJWTAndSeed(string(jwt), os.Getenv("NEX_AGENT_NATS_USER_SEED")),
		nats.CustomInboxPrefix(protocol.InboxPrefix(id)))
	if err != nil {
		return fmt.Errorf("connect to register: %w", err)
	}
	xk, _ := nkeys.CreateCurveKeys()
	xpub, _ := xk.PublicKey()
	body, _ := json.Marshal(protocol.RegisterAgentRequest{Description: "upstream-SDK test double", Name: "up",
		PublicXKey: xpub, RegisterType: "up", StartRequestSchema: `{"type":"object"}`, Version: "0.0.1",
		SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleJob, protocol.LifecycleService}})
	m, err := rc.Request(protocol.RegisterSubject(node, id), body, time.Minute)
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	rc.Close()
	var resp protocol.RegisterAgentResponse
	if err := json.Unmarshal(m.Data, &resp); err != nil || !resp.Success {
		return fmt.Errorf("register: %q %v", m.Data, err)
	}
	cd := resp.ConnectionData
	nc, err := nats.Connect(servers, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed), nats.CustomInboxPrefix(cd.InboxPrefix))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	n := &nexlet{nc: nc, node: node, id: id, log: log, workloads: map[string]protocol.StartWorkloadRequest{}}
	p := protocol.AgentPrefix(node)
	for subj, h := range map[string]nats.MsgHandler{
		p + "." + id + ".STARTWORKLOAD.*": n.onStart,
		p + "." + id + ".PING":            n.onPing,
		p + ".QUERYWORKLOADS":             n.onQuery,
	} {
		if _, err := nc.QueueSubscribe(subj, id, h); err != nil {
			return err
		}
	}
	if err := nc.Flush(); err != nil {
		return err
	}
	n.heartbeat()
	for wid, w := range resp.ExistingState {
		go n.start(wid, w.Request)
	}
	for range time.Tick(time.Second) {
		n.heartbeat()
	}
	return nil
}

func (n *nexlet) heartbeat() {
	n.mu.Lock()
	hb := protocol.AgentHeartbeat{Data: "{}", Summary: n.summaryLocked()}
	n.mu.Unlock()
	b, _ := json.Marshal(hb)
	_ = n.nc.Publish(protocol.AgentHeartbeatSubject(n.node, n.id), b)
}

func (n *nexlet) summaryLocked() protocol.AgentSummary {
	return protocol.AgentSummary{Name: "up", Type: "up", State: "running", Version: "0.0.1",
		SupportedLifecycles: "job,service", WorkloadCount: len(n.workloads), StartTime: time.Now().UTC()}
}

func (n *nexlet) start(wid string, req protocol.StartWorkloadRequest) {
	n.mu.Lock()
	n.workloads[wid] = req
	fmt.Fprintf(n.log, "start %s\n", wid)
	n.mu.Unlock()
	if req.WorkloadLifecycle != protocol.LifecycleJob {
		return
	}
	time.AfterFunc(200*time.Millisecond, func() {
		n.mu.Lock()
		delete(n.workloads, wid)
		n.mu.Unlock()
		ev, _ := json.Marshal(protocol.WorkloadStoppedEvent{ID: wid, Namespace: req.Namespace, WorkloadType: "up"})
		_ = n.nc.Publish(protocol.EventSubject(req.Namespace, protocol.EventWorkloadStopped), ev)
	})
}

func (n *nexlet) onStart(m *nats.Msg) {
	wid := protocol.LastToken(m.Subject)
	var req protocol.AgentStartWorkloadRequest
	if err := json.Unmarshal(m.Data, &req); err != nil {
		_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderErrorCode: {"100"}, protocol.HeaderError: {err.Error()}}})
		return
	}
	n.start(wid, req.Request)
	b, _ := json.Marshal(protocol.StartWorkloadResponse{ID: wid, Name: req.Request.Name})
	_ = m.Respond(b)
}

func (n *nexlet) onPing(m *nats.Msg) {
	n.mu.Lock()
	b, _ := json.Marshal(n.summaryLocked())
	n.mu.Unlock()
	_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderAgentID: {n.id}}, Data: b})
}

func (n *nexlet) onQuery(m *nats.Msg) {
	var req protocol.AgentListWorkloadsRequest
	_ = json.Unmarshal(m.Data, &req)
	out := []protocol.WorkloadSummary{}
	n.mu.Lock()
	for id, w := range n.workloads {
		if req.Namespace != protocol.SystemNamespace && w.Namespace != req.Namespace {
			continue
		}
		ns := w.Namespace
		out = append(out, protocol.WorkloadSummary{ID: id, Name: w.Name, Namespace: &ns, Runtime: "--",
			StartTime: time.Now().UTC().Format(time.RFC3339), WorkloadLifecycle: string(w.WorkloadLifecycle),
			WorkloadState: protocol.WorkloadRunning, WorkloadType: "up"})
	}
	n.mu.Unlock()
	b, _ := json.Marshal(out)
	_ = m.Respond(b)
}
