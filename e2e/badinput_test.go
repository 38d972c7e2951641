package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestBadInputLeavesWorkloadsRunning: against a node running a workload, malformed
// control socket requests and malformed NATS deploys each get an error that names what
// was wrong and where, and the node keeps running the workload (the same processes,
// listed running), keeps serving, and starts nothing else.
func TestBadInputLeavesWorkloadsRunning(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	n.waitNative(t)
	nc := testnats.Connect(t, s)
	ask := func(subject, body string) *nats.Msg {
		t.Helper()
		m, err := nc.Request(subject, []byte(body), 30*time.Second)
		if err != nil {
			t.Fatalf("%s %s: %v", subject, body, err)
		}
		return m
	}
	bid := func() string {
		t.Helper()
		m := ask(protocol.AuctionSubject("tenant"), `{"agent_type":"native","auction_id":"bad","tags":null}`)
		var o map[string]any
		_ = json.Unmarshal(m.Data, &o)
		id, _ := o["bidder_id"].(string)
		if id == "" {
			t.Fatalf("auction reply %q", m.Data)
		}
		return id
	}
	deploy := func(runRequest string) string {
		b, _ := json.Marshal(map[string]any{"name": "w", "namespace": "tenant", "description": "bad input", "workload_type": "native",
			"workload_lifecycle": "service", "run_request": runRequest, "tags": map[string]string{}})
		return string(b)
	}
	m := ask(protocol.DeploySubject("tenant", bid()), deploy(`{"uri":"file:///bin/sleep","argv":["600"]}`))
	var started struct{ ID string }
	if err := json.Unmarshal(m.Data, &started); err != nil || started.ID == "" || m.Header.Get("Nats-Service-Error-Code") != "" {
		t.Fatalf("deploy: %q %v", m.Data, m.Header)
	}
	t.Cleanup(func() {
		_, _ = nc.Request(protocol.UndeploySubject("tenant", started.ID), []byte(`{"namespace":"tenant"}`), 30*time.Second)
	})
	var pids []int
	testkit.EventuallyWithin(t, 30*time.Second, "the workload's process", func() bool { pids = workloadPIDs(t, started.ID); return len(pids) > 0 })

	// The control socket: each request answered 400 (or 404) with a JSON error naming
	// the place; none changes the node (the lame-duck ones least of all).
	for _, c := range []struct{ method, target, body, want string }{
		{"POST", "/v1/lameduck", `{"delay":"soon"}`, `request body: duration "soon"`},
		{"POST", "/v1/lameduck", `{"delay":`, "request body: truncated"},
		{"POST", "/v1/lameduck", `{"dealy":"1m"}`, `unknown field "dealy"`},
		{"POST", "/v1/lameduck", `{"delay":-60000000000}`, "delay -1m0s must not be negative"},
		{"GET", "/v1/logs?lines=-3", "", `query: lines="-3"`},
		{"PUT", "/v1/secrets/..%2Fetc/k", `{"value":"x"}`, `namespace "../etc"`},
		{"GET", "/v9/status", "", "API version v9"},
	} {
		status, eb := rawControl(t, n.socket, c.method, c.target, c.body)
		if status < 400 || status >= 500 || !strings.Contains(eb.Error, c.want) {
			t.Errorf("control %s %s %s: %d %q, want a 4xx naming %q", c.method, c.target, c.body, status, eb.Error, c.want)
		}
	}
	// Bytes that are not HTTP at all: the connection is refused, the socket serves on.
	conn, err := net.Dial("unix", n.socket)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Write([]byte("\x00\x01 not http\r\n\r\n"))
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	reply := make([]byte, 512)
	k, _ := conn.Read(reply)
	conn.Close()
	if !strings.HasPrefix(string(reply[:k]), "HTTP/1.1 400") {
		t.Errorf("non-HTTP bytes on the control socket answered %q, want a 400", reply[:k])
	}

	// NATS deploys: each answered 400 with an error naming the field, the node's or,
	// for a run_request the native nexlet refuses, the nexlet's relayed (the deploy
	// outcome "not started"); nothing starts. Before, the nexlet's refusals came with
	// its generic code 100.
	for _, c := range []struct{ body, want string }{
		{`{`, "StartWorkloadRequest"},
		{`{"name":"w","namespace":"tenant","description":"","workload_type":"native","workload_lifecycle":"service","run_request":7,"tags":{}}`, `"run_request"`},
		{`{"name":"w","namespace":"tenant","description":"","workload_type":"native","workload_lifecycle":"sometimes","run_request":"{}","tags":{}}`, "workload_lifecycle"},
		{deploy(`{"uri":"file:///bin/sleep","limits":{"memory_max":"lots"}}`), "limits.memory_max"},
		{deploy(`{"uri":"file:///bin/sleep","stdin":"x"}`), "stdin"},
		{deploy(`{"uri":"file:///bin/sleep","restart":{"backoff":"-1s"}}`), "restart.backoff"},
		{`{"name":"w","namespace":"tenant","workload_type":"native","workload_lifecycle":"service","run_request":"{}","tags":{}}`, `field "description": required field is missing`},
		{deploy(`not json`), "run_request"},
	} {
		m := ask(protocol.DeploySubject("tenant", bid()), c.body)
		code, text := m.Header.Get("Nats-Service-Error-Code"), m.Header.Get("Nats-Service-Error")
		if code != "400" || !strings.Contains(text, c.want) || m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
			t.Errorf("deploy %s: %s %q (%s), want an error naming %q", c.body, code, text, m.Data, c.want)
		}
	}

	// Nothing was lost or started: the same processes, the node running and not lame
	// duck, one workload listed, running.
	if now := workloadPIDs(t, started.ID); !slices.Equal(now, pids) {
		t.Errorf("the workload's processes were %v, now %v", pids, now)
	}
	var st struct{ State string }
	if err := json.Unmarshal([]byte(n.mustCtl(t, "status", "--json")), &st); err != nil || st.State != "running" {
		t.Errorf("node state %q after the bad requests (%v), want running", st.State, err)
	}
	ws := n.workloads(t)
	if len(ws) != 1 || ws[0].ID != started.ID || ws[0].State != "running" {
		t.Errorf("workloads after the bad requests: %+v, want %s alone, running", ws, started.ID)
	}
}

// rawControl sends one HTTP request on the control socket and returns its status and
// error body (an error that is not a JSON ErrorBody fails the test).
func rawControl(t *testing.T, sock, method, target, body string) (int, control.ErrorBody) {
	t.Helper()
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
	req, err := http.NewRequest(method, "http://nexd"+target, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var eb control.ErrorBody
	if resp.StatusCode >= 400 {
		if err := json.Unmarshal(data, &eb); err != nil || eb.Code != resp.StatusCode || eb.Error == "" {
			t.Errorf("%s %s: %d with body %q, not a JSON error (%v)", method, target, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode, eb
}
