package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// These tests speak to a real nexd over raw NATS, with subjects and bodies written by
// hand the way upstream's Go client sends them (upstream-nex.md §2.2 and §2.5), and
// check the reply JSON by key, not through protocol/, so that a change on both sides
// of the wire cannot hide a break with upstream.

// silence is how long a request waits before a missing reply counts as a silent drop.
// A drop is only checked where the node does hold a subscription (no "no responders").
// The waits overlap: quiet only sends, and the test's end waits out the silence of
// every quiet request at once (see checkQuiet).
const silence = 1500 * time.Millisecond

type conformance struct {
	t      *testing.T
	nc     *nats.Conn
	nodeID string
	quiets []quietReq // requests that must get no reply
}

type quietReq struct {
	subject, body string
	sub           *nats.Subscription // on the request's reply inbox
	sent          time.Time
}

func newConformance(t *testing.T, extra ...string) *conformance {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: append([]string{"--tags", "zone=a"}, extra...)})
	st := n.waitReady(t)
	c := &conformance{t: t, nc: testnats.Connect(t, s), nodeID: st.NodeID}
	// Registered after the node's cleanup, so it runs first, with the node still up.
	t.Cleanup(c.checkQuiet)
	// No warm-up auction: a node that says it is running bids at once (READY follows
	// the native nexlet's first heartbeat), and the first auction of each test is
	// exactly what upstream's client sends then.
	return c
}

// bid runs an auction in namespace ns for the native nexlet and returns the bidder id.
func (c *conformance) bid(ns string) string {
	c.t.Helper()
	o := c.object(c.ask("$NEX.SVC."+ns+".control.AUCTION", `{"agent_type":"native","auction_id":"b","tags":null}`))
	id, _ := o["bidder_id"].(string)
	if id == "" {
		c.t.Fatalf("bid without bidder_id: %v", o)
	}
	return id
}

// ask sends body on subject and returns the first reply.
func (c *conformance) ask(subject, body string) *nats.Msg {
	c.t.Helper()
	m, err := c.nc.Request(subject, []byte(body), 30*time.Second)
	if err != nil {
		c.t.Fatalf("%s %s: %v", subject, body, err)
	}
	return m
}

// quiet sends a request that the node must hold the subject for but not answer;
// checkQuiet, at the end of the test, gives it silence to prove that.
func (c *conformance) quiet(subject, body string) {
	c.t.Helper()
	inbox := nats.NewInbox()
	sub, err := c.nc.SubscribeSync(inbox)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := c.nc.PublishRequest(subject, inbox, []byte(body)); err != nil {
		c.t.Fatalf("%s: %v", subject, err)
	}
	c.quiets = append(c.quiets, quietReq{subject: subject, body: body, sub: sub, sent: time.Now()})
}

// checkQuiet fails the test for every quiet request that got a reply, or found no
// responder, within silence of being sent.
func (c *conformance) checkQuiet() {
	for _, q := range c.quiets {
		m, err := q.sub.NextMsg(max(time.Until(q.sent.Add(silence)), time.Millisecond))
		_ = q.sub.Unsubscribe()
		switch {
		case errors.Is(err, nats.ErrTimeout):
		case errors.Is(err, nats.ErrNoResponders):
			c.t.Errorf("%s: no responders; the node should hold the subject and stay silent", q.subject)
		case err != nil:
			c.t.Errorf("%s: %v", q.subject, err)
		default:
			c.t.Errorf("%s %s: got reply %q (headers %v), want silence", q.subject, q.body, m.Data, m.Header)
		}
	}
}

// object decodes a JSON object reply, failing on a micro error reply.
func (c *conformance) object(m *nats.Msg) map[string]any {
	c.t.Helper()
	if code := m.Header.Get("Nats-Service-Error-Code"); code != "" {
		c.t.Fatalf("%s: error reply %s %q", m.Subject, code, m.Data)
	}
	var o map[string]any
	if err := json.Unmarshal(m.Data, &o); err != nil {
		c.t.Fatalf("reply %q is not a JSON object: %v", m.Data, err)
	}
	return o
}

// errorReply checks a micro error: status header, message header and the body
// {"error_id","error"}.
func (c *conformance) errorReply(m *nats.Msg, code string) map[string]any {
	c.t.Helper()
	if got := m.Header.Get("Nats-Service-Error-Code"); got != code {
		c.t.Fatalf("error code %q, want %q (body %q)", got, code, m.Data)
	}
	if m.Header.Get("Nats-Service-Error") == "" {
		c.t.Errorf("error reply without a Nats-Service-Error header")
	}
	var o map[string]any
	if err := json.Unmarshal(m.Data, &o); err != nil {
		c.t.Fatalf("error body %q: %v", m.Data, err)
	}
	id, _ := o["error_id"].(string)
	text, _ := o["error"].(string)
	if id == "" || text == "" || len(o) != 2 {
		c.t.Errorf("error body %s, want exactly {error_id, error}", m.Data)
	}
	return o
}

// keys checks that o holds every key with the JSON kind given ("string", "number",
// "bool", "object", "array" or "null-or-object").
func keys(t *testing.T, what string, o map[string]any, want map[string]string) {
	t.Helper()
	for k, kind := range want {
		v, ok := o[k]
		if !ok {
			t.Errorf("%s: key %q missing in %v", what, k, o)
			continue
		}
		got := "null"
		switch v.(type) {
		case string:
			got = "string"
		case float64:
			got = "number"
		case bool:
			got = "bool"
		case map[string]any:
			got = "object"
		case []any:
			got = "array"
		}
		if got != kind && (kind != "null-or-object" || (got != "null" && got != "object")) {
			t.Errorf("%s: key %q is %s (%v), want %s", what, k, got, v, kind)
		}
	}
}

// TestConformanceAdmin: PING, PTAGS, INFO, AGENTID and their silent and error cases.
func TestConformanceAdmin(t *testing.T) {
	t.Parallel()
	c := newConformance(t)
	pingKeys := map[string]string{"agent_count": "number", "node_id": "string", "start_time": "string",
		"state": "string", "tags": "object", "version": "string", "xkey": "string"}

	for _, body := range []string{`{"filter":null}`, `{"filter":{}}`, `{"filter":{"zone":"a"}}`} {
		for _, subj := range []string{"$NEX.SVC.system.control.PING", "$NEX.SVC.system.control.PING." + c.nodeID} {
			o := c.object(c.ask(subj, body))
			keys(t, "NodePingResponse", o, pingKeys)
			if o["node_id"] != c.nodeID || o["state"] != "running" || o["agent_count"] != float64(1) {
				t.Errorf("%s %s: %v", subj, body, o)
			}
			if _, err := time.Parse(time.RFC3339, o["start_time"].(string)); err != nil {
				t.Errorf("start_time %v is not RFC3339", o["start_time"])
			}
			if x, _ := o["xkey"].(string); !strings.HasPrefix(x, "X") {
				t.Errorf("xkey %q is not a curve public key", x)
			}
			tags, _ := o["tags"].(map[string]any)
			for _, k := range []string{"nex.os", "nex.arch", "nex.cpucount", "nex.lameduck", "nex.nexus", "nex.node"} {
				if _, ok := tags[k]; !ok {
					t.Errorf("tag %s missing: %v", k, tags)
				}
			}
			if tags["zone"] != "a" || tags["nex.lameduck"] != "false" {
				t.Errorf("tags %v", tags)
			}
		}
	}
	// The filter key is required; an unmatched filter is a silent drop.
	c.errorReply(c.ask("$NEX.SVC.system.control.PING", `{}`), "400")
	c.errorReply(c.ask("$NEX.SVC.system.control.PING", `not json`), "400")
	c.quiet("$NEX.SVC.system.control.PING", `{"filter":{"zone":"b"}}`)
	c.quiet("$NEX.SVC.system.control.PING."+c.nodeID, `{"filter":{"nex.os":"plan9"}}`)

	// PTAGS: a flat map of strings, whatever the body.
	tags := c.object(c.ask("$NEX.SVC.system.control.PTAGS", ``))
	if tags["zone"] != "a" || tags["nex.node"] != "e2e" {
		t.Errorf("PTAGS %v", tags)
	}
	for k, v := range tags {
		if _, ok := v.(string); !ok {
			t.Errorf("PTAGS %s = %v, want a string", k, v)
		}
	}

	// INFO: uptime is a Go duration string; agent summaries carry health and stoplight.
	o := c.object(c.ask("$NEX.SVC.system.control.INFO."+c.nodeID, `{}`))
	keys(t, "NodeInfoResponse", o, map[string]string{"node_id": "string", "tags": "object", "uptime": "string",
		"version": "string", "xkey": "string", "node_agent_summaries": "array"})
	if _, err := time.ParseDuration(fmt.Sprint(o["uptime"])); err != nil {
		t.Errorf("uptime %v is not a Go duration: %v", o["uptime"], err)
	}
	sums, _ := o["node_agent_summaries"].([]any)
	if len(sums) != 1 {
		t.Fatalf("node_agent_summaries %v, want the native nexlet", o["node_agent_summaries"])
	}
	sum, _ := sums[0].(map[string]any)
	keys(t, "NodeAgentSummary", sum, map[string]string{"agent_id": "string", "agent_health": "string",
		"agent_health_stoplight": "string", "agent_last_heartbeat_time": "string", "agent_summary": "object"})
	if sum["agent_health"] != "healthy" || sum["agent_health_stoplight"] != "🟢" {
		t.Errorf("agent health %v %v", sum["agent_health"], sum["agent_health_stoplight"])
	}
	as, _ := sum["agent_summary"].(map[string]any)
	keys(t, "AgentSummary", as, map[string]string{"name": "string", "type": "string", "start_time": "string",
		"state": "string", "supported_lifecycles": "string", "version": "string", "workload_count": "number"})
	if as["type"] != "native" || as["name"] != "go_exec" || as["supported_lifecycles"] != "job,service" {
		t.Errorf("agent summary %v", as)
	}

	// AGENTID: raw text in, raw text out; silent for an unknown name.
	m := c.ask("$NEX.SVC.system.control.AGENTID."+c.nodeID, `go_exec`)
	if string(m.Data) != sum["agent_id"] {
		t.Errorf("AGENTID go_exec = %q, want %v", m.Data, sum["agent_id"])
	}
	c.quiet("$NEX.SVC.system.control.AGENTID."+c.nodeID, `no_such_nexlet`)

	// Admin endpoints exist only in the system namespace.
	for _, subj := range []string{"$NEX.SVC.tenant.control.PING", "$NEX.SVC.tenant.control.PTAGS",
		"$NEX.SVC.tenant.control.INFO." + c.nodeID, "$NEX.SVC.tenant.control.LAMEDUCK." + c.nodeID} {
		if _, err := c.nc.Request(subj, []byte(`{"filter":null}`), 5*time.Second); !errors.Is(err, nats.ErrNoResponders) {
			t.Errorf("%s: %v, want no responders", subj, err)
		}
	}
}

// TestConformanceWorkloads: AUCTION, ADEPLOY, WPING, CLONE and UNDEPLOY as upstream's
// client sends them, with the namespace rule and the silent drops.
func TestConformanceWorkloads(t *testing.T) {
	t.Parallel()
	c := newConformance(t)
	bidKeys := map[string]string{"bidder_id": "string", "start_request_schema": "string",
		"supported_lifecycles": "array", "xkey": "string"}

	// Auction: tags may be null or an object; the key itself is required.
	var bidder string
	for _, tags := range []string{`null`, `{}`, `{"zone":"a","nex.os":"linux"}`} {
		o := c.object(c.ask("$NEX.SVC.tenant.control.AUCTION", `{"agent_type":"native","auction_id":"a1","tags":`+tags+`}`))
		keys(t, "AuctionResponse", o, bidKeys)
		var schema map[string]any
		if err := json.Unmarshal([]byte(o["start_request_schema"].(string)), &schema); err != nil {
			t.Errorf("start_request_schema is not a JSON document: %v", err)
		}
		if lc, _ := o["supported_lifecycles"].([]any); !slices.Contains(lc, any("service")) || !slices.Contains(lc, any("job")) {
			t.Errorf("supported_lifecycles %v", o["supported_lifecycles"])
		}
		bidder = o["bidder_id"].(string)
	}
	c.errorReply(c.ask("$NEX.SVC.tenant.control.AUCTION", `{"agent_type":"native","auction_id":"a1"}`), "400")
	c.quiet("$NEX.SVC.tenant.control.AUCTION", `{"agent_type":"wasm","auction_id":"a2","tags":{}}`)
	c.quiet("$NEX.SVC.tenant.control.AUCTION", `{"agent_type":"native","auction_id":"a3","tags":{"zone":"b"}}`)

	// Deploy: run_request is a string holding the nexlet's JSON. An unknown bidder id
	// is silent. A bidder id is used up by one deploy attempt (nexd does not let a bid
	// be reused within its TTL as upstream does), so each case runs its own auction.
	start := func(ns, name string) string {
		return `{"name":"` + name + `","namespace":"` + ns + `","description":"conformance","workload_type":"native",` +
			`"workload_lifecycle":"service","run_request":"{\"uri\":\"file:///bin/sleep\",\"argv\":[\"600\"]}","tags":{"zone":"a"}}`
	}
	c.quiet("$NEX.SVC.tenant.control.ADEPLOY.not-a-bidder", start("tenant", "w0"))
	c.errorReply(c.ask("$NEX.SVC.tenant.control.ADEPLOY."+bidder, start("other", "w0")), "403")
	c.quiet("$NEX.SVC.tenant.control.ADEPLOY."+bidder, start("tenant", "w0"))
	c.errorReply(c.ask("$NEX.SVC.tenant.control.ADEPLOY."+c.bid("tenant"),
		strings.Replace(start("tenant", "w0"), `\"uri\":\"file:///bin/sleep\",`, ``, 1)), "400")
	c.errorReply(c.ask("$NEX.SVC.tenant.control.ADEPLOY."+c.bid("tenant"), `{"name":"w0","namespace":"tenant"}`), "400")
	o := c.object(c.ask("$NEX.SVC.tenant.control.ADEPLOY."+c.bid("tenant"), start("tenant", "w1")))
	keys(t, "StartWorkloadResponse", o, map[string]string{"id": "string", "name": "string"})
	id := o["id"].(string)
	if o["name"] != "w1" || id == "" {
		t.Fatalf("deploy reply %v", o)
	}
	t.Cleanup(func() {
		_, _ = c.nc.Request("$NEX.SVC.system.control.UNDEPLOY."+id, []byte(`{"namespace":"tenant"}`), 30*time.Second)
	})

	// List: an array of summaries; another namespace sees nothing of it.
	list := func(subjNS, body string) []map[string]any {
		t.Helper()
		m := c.ask("$NEX.SVC."+subjNS+".control.WPING", body)
		var arr []map[string]any
		if err := json.Unmarshal(m.Data, &arr); err != nil {
			t.Fatalf("WPING reply %q is not an array: %v", m.Data, err)
		}
		return arr
	}
	var got []map[string]any
	testkit.EventuallyWithin(t, 30*time.Second, "the workload in the list", func() bool {
		got = list("tenant", `{"namespace":"tenant","filter":[]}`)
		return len(got) == 1 && got[0]["workload_state"] == "running"
	})
	keys(t, "WorkloadSummary", got[0], map[string]string{"id": "string", "name": "string", "namespace": "string",
		"start_time": "string", "runtime": "string", "workload_type": "string", "workload_lifecycle": "string",
		"workload_state": "string", "tags": "object"})
	if got[0]["id"] != id || got[0]["namespace"] != "tenant" || got[0]["workload_lifecycle"] != "service" {
		t.Errorf("summary %v", got[0])
	}
	if l := list("tenant", `{"namespace":"tenant","filter":["w1"]}`); len(l) != 1 {
		t.Errorf("filter by name: %v", l)
	}
	if l := list("tenant", `{"namespace":"tenant","filter":["nope"]}`); len(l) != 0 {
		t.Errorf("filter nope: %v", l)
	}
	if l := list("other", `{"namespace":"other","filter":[]}`); len(l) != 0 {
		t.Errorf("namespace other sees %v", l)
	}
	if l := list("system", `{"namespace":"system","filter":[]}`); len(l) != 1 {
		t.Errorf("system sees %v", l)
	}
	c.errorReply(c.ask("$NEX.SVC.tenant.control.WPING", `{"namespace":"other","filter":[]}`), "403")
	c.errorReply(c.ask("$NEX.SVC.tenant.control.WPING", `{"namespace":"tenant"}`), "400")

	// Clone: the raw StartWorkloadRequest, not wrapped; silent when unknown or foreign.
	clone := `{"namespace":"tenant","new_target_xkey":"XAXXKEYFORCLONE"}`
	o = c.object(c.ask("$NEX.SVC.tenant.control.CLONE."+id, clone))
	keys(t, "StartWorkloadRequest", o, map[string]string{"name": "string", "namespace": "string", "description": "string",
		"workload_type": "string", "workload_lifecycle": "string", "run_request": "string", "tags": "object"})
	if _, wrapped := o["start_workload_request"]; wrapped || o["name"] != "w1" || o["namespace"] != "tenant" {
		t.Errorf("clone reply %v", o)
	}
	var run map[string]any
	if err := json.Unmarshal([]byte(o["run_request"].(string)), &run); err != nil || run["uri"] != "file:///bin/sleep" {
		t.Errorf("clone run_request %v: %v", o["run_request"], err)
	}
	c.object(c.ask("$NEX.SVC.system.control.CLONE."+id, `{"namespace":"system","new_target_xkey":"X"}`))
	c.quiet("$NEX.SVC.tenant.control.CLONE.no-such-workload", clone)
	c.quiet("$NEX.SVC.other.control.CLONE."+id, `{"namespace":"other","new_target_xkey":"X"}`)
	c.errorReply(c.ask("$NEX.SVC.tenant.control.CLONE."+id, `{"namespace":"other","new_target_xkey":"X"}`), "403")

	// Stop: another namespace cannot; the owner can, once.
	stopKeys := map[string]string{"id": "string", "message": "string", "stopped": "bool", "workload_type": "string"}
	o = c.object(c.ask("$NEX.SVC.other.control.UNDEPLOY."+id, `{"namespace":"other"}`))
	keys(t, "StopWorkloadResponse", o, stopKeys)
	if o["stopped"] != false || o["message"] != "workload not found" || o["id"] != id || o["workload_type"] != "" {
		t.Errorf("foreign stop %v", o)
	}
	c.errorReply(c.ask("$NEX.SVC.tenant.control.UNDEPLOY."+id, `{"namespace":"other"}`), "403")
	c.errorReply(c.ask("$NEX.SVC.tenant.control.UNDEPLOY."+id, `{}`), "400")
	o = c.object(c.ask("$NEX.SVC.tenant.control.UNDEPLOY."+id, `{"namespace":"tenant"}`))
	keys(t, "StopWorkloadResponse", o, stopKeys)
	if o["stopped"] != true || o["id"] != id || o["workload_type"] != "native" {
		t.Errorf("stop %v", o)
	}
	// A repeat is answered in upstream's shape, stopped, saying since when (upstream
	// nodes say "workload not found"); another namespace still hears not found.
	o = c.object(c.ask("$NEX.SVC.tenant.control.UNDEPLOY."+id, `{"namespace":"tenant"}`))
	keys(t, "StopWorkloadResponse", o, stopKeys)
	if msg, _ := o["message"].(string); o["stopped"] != true || !strings.HasPrefix(msg, "already stopped at ") || o["id"] != id || o["workload_type"] != "native" {
		t.Errorf("second stop %v", o)
	}
	o = c.object(c.ask("$NEX.SVC.other.control.UNDEPLOY."+id, `{"namespace":"other"}`))
	if o["stopped"] != false || o["message"] != "workload not found" {
		t.Errorf("second stop from another namespace %v", o)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the stopped workload leaves the list", func() bool {
		return len(list("tenant", `{"namespace":"tenant","filter":[]}`)) == 0
	})
}

// TestConformanceJobEvent: a failed job's WORKLOADSTOPPED carries error.code as a
// JSON string (upstream's decoders reject a number).
func TestConformanceJobEvent(t *testing.T) {
	t.Parallel()
	c := newConformance(t, "--events", "nats")
	events, err := c.nc.SubscribeSync("$NEX.FEED.tenant.events.>")
	if err != nil {
		t.Fatal(err)
	}
	_ = c.nc.Flush()
	o := c.object(c.ask("$NEX.SVC.tenant.control.AUCTION", `{"agent_type":"native","auction_id":"j","tags":null}`))
	body := `{"name":"job","namespace":"tenant","description":"","workload_type":"native","workload_lifecycle":"job",` +
		`"run_request":"{\"uri\":\"file:///bin/sh\",\"argv\":[\"-c\",\"exit 3\"]}","tags":{}}`
	id := c.object(c.ask("$NEX.SVC.tenant.control.ADEPLOY."+o["bidder_id"].(string), body))["id"]
	for {
		m, err := events.NextMsg(60 * time.Second)
		if err != nil {
			t.Fatalf("no WORKLOADSTOPPED for %v: %v", id, err)
		}
		var ev map[string]any
		if err := json.Unmarshal(m.Data, &ev); err != nil {
			t.Fatalf("event %q: %v", m.Data, err)
		}
		if !strings.HasSuffix(m.Subject, ".WORKLOADSTOPPED") || ev["id"] != id {
			continue
		}
		keys(t, "WorkloadStoppedEvent", ev, map[string]string{"id": "string", "namespace": "string", "workload_type": "string", "error": "object"})
		e, _ := ev["error"].(map[string]any)
		keys(t, "WorkloadStoppedEvent.error", e, map[string]string{"code": "string", "message": "string"})
		if e["code"] != "3" {
			t.Errorf("error.code = %v, want \"3\"", e["code"])
		}
		return
	}
}

// TestConformanceLameduck: a tag mismatch is silent; the reply shape; the node then
// reports lameduck and stops bidding.
func TestConformanceLameduck(t *testing.T) {
	t.Parallel()
	c := newConformance(t)
	subj := "$NEX.SVC.system.control.LAMEDUCK." + c.nodeID
	c.quiet(subj, `{"delay":"1m0s","tag":{"zone":"b"}}`)
	c.errorReply(c.ask(subj, `{}`), "400")
	c.errorReply(c.ask(subj, `{"delay":"soon"}`), "400")
	o := c.object(c.ask(subj, `{"delay":"10m0s","tag":{"zone":"a"}}`))
	keys(t, "LameduckResponse", o, map[string]string{"success": "bool", "message": "string"})
	if o["success"] != true {
		t.Fatalf("lameduck %v", o)
	}
	o = c.object(c.ask("$NEX.SVC.system.control.PING."+c.nodeID, `{"filter":null}`))
	if o["state"] != "lameduck" || o["tags"].(map[string]any)["nex.lameduck"] != "true" {
		t.Errorf("after lameduck: %v", o)
	}
	c.quiet("$NEX.SVC.system.control.AUCTION", `{"agent_type":"native","auction_id":"ld","tags":null}`)
}

// TestConformanceMalformed: every control subject answers malformed JSON with a 400
// error body and the node keeps serving.
func TestConformanceMalformed(t *testing.T) {
	t.Parallel()
	c := newConformance(t)
	for _, subj := range []string{
		"$NEX.SVC.system.control.PING",
		"$NEX.SVC.system.control.PING." + c.nodeID,
		"$NEX.SVC.system.control.LAMEDUCK." + c.nodeID,
		"$NEX.SVC.tenant.control.AUCTION",
		"$NEX.SVC.tenant.control.ADEPLOY.",
		"$NEX.SVC.tenant.control.UNDEPLOY.any",
		"$NEX.SVC.tenant.control.CLONE.any",
		"$NEX.SVC.tenant.control.WPING",
	} {
		for _, body := range []string{`{`, `[]`, `{"filter":7,"namespace":[],"delay":{},"tags":"x","agent_type":1}`} {
			to := subj
			if strings.HasSuffix(subj, ".ADEPLOY.") {
				// Only the node holding the bid answers, so give it a real one.
				to += c.bid("tenant")
			}
			m, err := c.nc.Request(to, []byte(body), 30*time.Second)
			if err != nil {
				t.Errorf("%s %s: %v, want a 400 reply", to, body, err)
				continue
			}
			c.errorReply(m, "400")
		}
	}
	c.object(c.ask("$NEX.SVC.system.control.PING."+c.nodeID, `{"filter":null}`))
}
