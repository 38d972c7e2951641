package node

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

func TestPingInfoTagsFiveNodes(t *testing.T) {
	f := newFixture(t, 5, func(i int, o *Options) {
		o.Tags = map[string]string{"zone": []string{"a", "b"}[i%2]}
	})
	f.healthyAgent(f.nodes[1], "agent1", "go_exec", "native", nil)

	msgs := collect(t, f.client, protocol.PingSubject(), mustJSON(t, protocol.NodePingRequest{Filter: map[string]string{}}), 5, 10*time.Second, 300*time.Millisecond)
	if len(msgs) != 5 {
		t.Fatalf("nexus ping: got %d replies, want 5", len(msgs))
	}
	seen := map[string]protocol.NodePingResponse{}
	for _, m := range msgs {
		var p protocol.NodePingResponse
		if err := protocol.Decode(m.Data, &p); err != nil {
			t.Fatalf("ping reply %q: %v", m.Data, err)
		}
		seen[p.NodeID] = p
	}
	for i, n := range f.nodes {
		p, ok := seen[n.ID()]
		if !ok {
			t.Fatalf("node %d did not answer", i)
		}
		wantAgents := 0
		if i == 1 {
			wantAgents = 1
		}
		if p.AgentCount != wantAgents || p.State != protocol.NodeRunning || p.XKey != n.XKeyPublic() ||
			p.Tags[protocol.TagNode] != n.o.Name || p.Tags[protocol.TagNexus] != "testnexus" || p.Tags[protocol.TagLameduck] != "false" {
			t.Errorf("node %d ping = %+v", i, p)
		}
	}

	tests := []struct {
		name    string
		subject string
		body    string
		want    int
	}{
		{"filter one zone", protocol.PingSubject(), `{"filter":{"zone":"a"}}`, 3},
		{"filter by node name", protocol.PingSubject(), `{"filter":{"nex.node":"node-3"}}`, 1},
		{"filter mismatch is silent", protocol.PingSubject(), `{"filter":{"zone":"nowhere"}}`, 0},
		{"null body means no filter", protocol.PingSubject(), `null`, 5},
		{"direct ping", protocol.PingNodeSubject(f.nodes[2].ID()), `{"filter":null}`, 1},
		{"direct ping filtered out", protocol.PingNodeSubject(f.nodes[2].ID()), `{"filter":{"zone":"b"}}`, 0},
		{"ptags", protocol.PTagsSubject(), ``, 5},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := collect(t, f.client, tc.subject, []byte(tc.body), tc.want, 10*time.Second, 300*time.Millisecond)
			if len(got) != tc.want {
				t.Fatalf("got %d replies, want %d", len(got), tc.want)
			}
			for _, m := range got {
				if c := m.Header.Get(protocol.HeaderErrorCode); c != "" {
					t.Fatalf("error reply %s %s", c, m.Data)
				}
			}
		})
	}

	// Admin endpoints exist only under system.
	if _, err := f.client.Request(protocol.ControlPrefix("tenant")+".PING", []byte(`{"filter":{}}`), time.Second); err != nats.ErrNoResponders {
		t.Errorf("ping under a user namespace: err = %v, want no responders", err)
	}

	m := request(t, f.client, protocol.InfoSubject(f.nodes[1].ID()), "{}")
	var info protocol.NodeInfoResponse
	if err := protocol.Decode(m.Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.NodeID != f.nodes[1].ID() || len(info.NodeAgentSummaries) != 1 {
		t.Fatalf("info = %+v", info)
	}
	s := info.NodeAgentSummaries[0]
	if s.AgentID != "agent1" || s.AgentHealth != protocol.HealthHealthy || s.AgentHealthStoplight != "🟢" || s.AgentSummary.Name != "go_exec" {
		t.Errorf("agent summary = %+v", s)
	}
	if _, err := time.ParseDuration(info.Uptime); err != nil {
		t.Errorf("uptime %q is not a Go duration: %v", info.Uptime, err)
	}

	agentIDSubj := protocol.ControlPrefix(protocol.SystemNamespace) + ".AGENTID." + f.nodes[1].ID()
	if m := request(t, f.client, agentIDSubj, "go_exec"); string(m.Data) != "agent1" {
		t.Errorf("AGENTID = %q", m.Data)
	}
	if got := collect(t, f.client, agentIDSubj, []byte("nope"), 0, time.Second, 300*time.Millisecond); len(got) != 0 {
		t.Errorf("AGENTID of unknown name answered %q", got[0].Data)
	}
}

func TestAuctionTagsThreeNodes(t *testing.T) {
	f := newFixture(t, 3, func(i int, o *Options) {
		o.Tags = map[string]string{"zone": []string{"a", "b", "a"}[i], "gpu": "no"}
	})
	agents := make([]*fakeAgent, 3)
	for i, n := range f.nodes {
		agents[i] = f.healthyAgent(n, "agent"+string(rune('0'+i)), "go_exec", "native", nil)
	}
	tests := []struct {
		name string
		req  protocol.AuctionRequest
		want int
	}{
		{"no tags", protocol.AuctionRequest{AgentType: "native"}, 3},
		{"zone a", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "a"}}, 2},
		{"all tags must match", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "a", "gpu": "yes"}}, 0},
		{"unknown tag", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"rack": "1"}}, 0},
		{"built-in tag", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-1"}}, 1},
		{"unknown type", protocol.AuctionRequest{AgentType: "wasm"}, 0},
		{"lifecycle supported", protocol.AuctionRequest{AgentType: "native", Lifecycle: protocol.LifecycleJob}, 3},
		{"lifecycle unsupported", protocol.AuctionRequest{AgentType: "native", Lifecycle: protocol.LifecycleFunction}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bids := f.auction("tenant", tc.req, tc.want)
			if len(bids) != tc.want {
				t.Fatalf("got %d bids, want %d", len(bids), tc.want)
			}
		})
	}
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "b"}}, 1)
	if len(bids) != 1 {
		t.Fatalf("zone b bids: %d", len(bids))
	}
	b := bids[0]
	if b.NodeID != f.nodes[1].ID() || b.NodeName != "node-1" || b.XKey != agents[1].req.PublicXKey || b.StartRequestSchema != testSchema ||
		len(b.SupportedLifecycles) != 2 || b.BidderID == "" {
		t.Errorf("bid = %+v", b)
	}
	// Reloaded tags apply at once.
	if err := f.nodes[0].SetTags(map[string]string{"zone": "c"}); err != nil {
		t.Fatal(err)
	}
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "c"}}, 1); len(got) != 1 || got[0].NodeID != f.nodes[0].ID() {
		t.Errorf("after SetTags: %+v", got)
	}
	if err := f.nodes[0].SetTags(map[string]string{"nex.os": "plan9"}); err == nil {
		t.Error("SetTags accepted a reserved nex. tag")
	}
}

func TestCapacityAndLoadInBids(t *testing.T) {
	f := newFixture(t, 1, nil)
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", func(a *fakeAgent) { a.req.MaxWorkloads = 1 })
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 || bids[0].WorkloadCount != 0 {
		t.Fatalf("bids = %+v", bids)
	}
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "w1", `{"cmd":"x"}`))
	if m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("deploy: %s", m.Data)
	}
	// Full at once, without waiting for a heartbeat to report it.
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 0); len(got) != 0 {
		t.Fatalf("a full nexlet bid: %+v", got)
	}
	testkit.Eventually(t, "heartbeat reports the workload", func() bool { return f.nodes[0].Agents()[0].Summary.WorkloadCount == 1 })
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 0); len(got) != 0 {
		t.Fatalf("a full nexlet bid after heartbeat: %+v", got)
	}
	_ = a
}

func TestLameduck(t *testing.T) {
	var calls atomic.Int32
	var gotDelay atomic.Int64
	f := newFixture(t, 3, func(i int, o *Options) {
		o.Tags = map[string]string{"zone": "a"}
		if i == 0 {
			o.OnLameduck = func(d time.Duration) { calls.Add(1); gotDelay.Store(int64(d)) }
		}
	})
	agents := make([]*fakeAgent, 3)
	for i, n := range f.nodes {
		agents[i] = f.healthyAgent(n, "agent"+string(rune('0'+i)), "go_exec", "native", nil)
	}
	old := f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-0"}}, 1)
	if len(old) != 1 {
		t.Fatal("no bid from node-0 before lameduck")
	}
	target := f.nodes[0].ID()

	// A tag filter that does not match is silent.
	if got := collect(t, f.client, protocol.LameduckSubject(target), []byte(`{"delay":"1m","tag":{"zone":"b"}}`), 0, time.Second, 300*time.Millisecond); len(got) != 0 {
		t.Fatalf("lameduck with a non-matching tag answered %q", got[0].Data)
	}
	m := request(t, f.client, protocol.LameduckSubject(target), `{"delay":"1m0s","tag":{"zone":"a"}}`)
	var resp protocol.LameduckResponse
	if err := protocol.Decode(m.Data, &resp); err != nil || !resp.Success || !strings.Contains(resp.Message, "lameduck") {
		t.Fatalf("lameduck reply %q: %v", m.Data, err)
	}
	if calls.Load() != 1 || time.Duration(gotDelay.Load()) != time.Minute {
		t.Errorf("OnLameduck calls=%d delay=%v", calls.Load(), time.Duration(gotDelay.Load()))
	}
	// The tag flips at once.
	var tags map[string]string
	if err := json.Unmarshal(request(t, f.client, protocol.PingNodeSubject(target), `{"filter":{}}`).Data, &struct {
		Tags *map[string]string `json:"tags"`
	}{&tags}); err != nil || tags[protocol.TagLameduck] != "true" {
		t.Fatalf("tags after lameduck: %v %v", tags, err)
	}
	if f.nodes[0].State() != protocol.NodeLameduck {
		t.Errorf("state = %s", f.nodes[0].State())
	}
	testkit.Eventually(t, "nexlet told to enter lameduck", func() bool {
		agents[0].mu.Lock()
		defer agents[0].mu.Unlock()
		return agents[0].lameducks == 1
	})
	// A lameduck node does not bid.
	for _, b := range f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 2) {
		if b.NodeID == target {
			t.Fatal("lameduck node bid")
		}
	}
	// And refuses a deploy to a bid it made before.
	m = request(t, f.client, protocol.DeploySubject("tenant", old[0].BidderID), startReq("tenant", "w", `{"cmd":"x"}`))
	code, body := errorReply(t, m)
	if code != "400" || !strings.Contains(body.Error, "lameduck") {
		t.Errorf("deploy to lameduck node: %s %+v", code, body)
	}
	if agents[0].workloadCount() != 0 {
		t.Error("lameduck node started a workload")
	}
	// A second request changes nothing.
	request(t, f.client, protocol.LameduckSubject(target), `{"delay":"5s"}`)
	if calls.Load() != 1 {
		t.Errorf("OnLameduck called again")
	}
	if m := request(t, f.client, protocol.LameduckSubject(target), `{"delay":"soon"}`); m.Header.Get(protocol.HeaderErrorCode) != "400" {
		t.Errorf("bad delay: %q", m.Data)
	}
}

func TestDeployListStopCloneRoundTrip(t *testing.T) {
	f := newFixture(t, 3, nil)
	agents := make([]*fakeAgent, 3)
	for i, n := range f.nodes {
		agents[i] = f.healthyAgent(n, "agent"+string(rune('0'+i)), "go_exec", "native", nil)
	}
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-2"}}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	req := startReq("tenant", "hello", `{"cmd":"echo hi"}`)
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.Name != "hello" || started.ID == "" {
		t.Fatalf("deploy reply %q %v", m.Data, err)
	}
	wid := started.ID
	// Minted for the body namespace and stored.
	agents[2].mu.Lock()
	cd := agents[2].creds[wid]
	agents[2].mu.Unlock()
	if cd.ConnName != "workload-tenant-"+wid {
		t.Errorf("workload creds = %+v", cd)
	}
	stored, _ := f.stores[2].ByType(context.Background(), "native")
	if _, ok := stored[wid]; !ok || f.stores[2].Len() != 1 {
		t.Fatalf("store = %+v", stored)
	}
	// A bidder id is single use.
	if got := collect(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), mustJSON(t, req), 0, time.Second, 300*time.Millisecond); len(got) != 0 {
		t.Fatalf("second deploy on one bid answered %q", got[0].Data)
	}

	// List: one array per node, ours holds the workload.
	list := collect(t, f.client, protocol.WPingSubject("tenant"), mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: "tenant", Filter: []string{}}), 3, 10*time.Second, 300*time.Millisecond)
	if len(list) != 3 {
		t.Fatalf("WPING replies: %d", len(list))
	}
	var all []protocol.WorkloadSummary
	for _, m := range list {
		var ws []protocol.WorkloadSummary
		if err := json.Unmarshal(m.Data, &ws); err != nil || ws == nil {
			t.Fatalf("WPING reply %q (must be an array, [] when empty): %v", m.Data, err)
		}
		all = append(all, ws...)
	}
	if len(all) != 1 || all[0].ID != wid {
		t.Fatalf("workloads = %+v", all)
	}
	if ws, err := f.nodes[2].Workloads(context.Background()); err != nil || len(ws) != 1 {
		t.Fatalf("Workloads() = %v %v", ws, err)
	}

	// Clone returns the bare start request.
	clone := collect(t, f.client, protocol.CloneSubject("tenant", wid), mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "tenant", NewTargetXKey: "X"}), 1, 10*time.Second, 300*time.Millisecond)
	if len(clone) != 1 {
		t.Fatalf("clone replies: %d", len(clone))
	}
	var cloned protocol.StartWorkloadRequest
	if err := protocol.Decode(clone[0].Data, &cloned); err != nil || cloned.RunRequest != req.RunRequest || cloned.Name != "hello" {
		t.Fatalf("clone %q: %v", clone[0].Data, err)
	}

	// Stop: every node answers, exactly one stopped it.
	stops := collect(t, f.client, protocol.UndeploySubject("tenant", wid), mustJSON(t, protocol.StopWorkloadRequest{Namespace: "tenant"}), 3, 10*time.Second, 300*time.Millisecond)
	stopped := 0
	for _, m := range stops {
		var r protocol.StopWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil {
			t.Fatalf("stop reply %q: %v", m.Data, err)
		}
		if r.Stopped {
			stopped++
			if r.WorkloadType != "native" || r.ID != wid {
				t.Errorf("stop reply %+v", r)
			}
		} else if r.Message != protocol.ErrTextWorkloadNotFound || r.ID != wid || r.WorkloadType != "" {
			t.Errorf("not-found reply %+v", r)
		}
	}
	if len(stops) != 3 || stopped != 1 {
		t.Fatalf("stop replies %d, stopped %d", len(stops), stopped)
	}
	if f.stores[2].Len() != 0 || agents[2].workloadCount() != 0 {
		t.Error("stopped workload still stored or running")
	}
}

func TestNamespaceIsolation(t *testing.T) {
	f := newFixture(t, 3, nil)
	agents := make([]*fakeAgent, 3)
	for i, n := range f.nodes {
		agents[i] = f.healthyAgent(n, "agent"+string(rune('0'+i)), "go_exec", "native", nil)
	}
	bids := f.auction("alpha", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-0"}}, 1)
	m := request(t, f.client, protocol.DeploySubject("alpha", bids[0].BidderID), startReq("alpha", "secret", `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil {
		t.Fatalf("deploy %q: %v", m.Data, err)
	}
	wid := started.ID

	// System may deploy into alpha; the creds are minted for the body namespace.
	sysBids := f.auction("system", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-2"}}, 1)
	m = request(t, f.client, protocol.DeploySubject("system", sysBids[0].BidderID), startReq("alpha", "bysystem", `{"cmd":"x"}`))
	var bySystem protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &bySystem); err != nil {
		t.Fatalf("system deploy %q: %v", m.Data, err)
	}
	agents[2].mu.Lock()
	cd := agents[2].creds[bySystem.ID]
	agents[2].mu.Unlock()
	if cd.ConnName != "workload-alpha-"+bySystem.ID {
		t.Errorf("system deploy minted %q, want alpha's creds", cd.ConnName)
	}

	// Deploying into another namespace from beta: 403.
	bids = f.auction("beta", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-1"}}, 1)
	m = request(t, f.client, protocol.DeploySubject("beta", bids[0].BidderID), startReq("alpha", "sneaky", `{"cmd":"x"}`))
	if code, _ := errorReply(t, m); code != "403" {
		t.Errorf("cross-namespace deploy: %s", code)
	}

	// Listing as beta shows nothing of alpha; asking for alpha is 403.
	for _, m := range collect(t, f.client, protocol.WPingSubject("beta"), mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: "beta", Filter: []string{}}), 3, 10*time.Second, 300*time.Millisecond) {
		if string(m.Data) != "[]" {
			t.Errorf("beta sees %s", m.Data)
		}
	}
	for _, m := range collect(t, f.client, protocol.WPingSubject("beta"), mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: "alpha", Filter: []string{}}), 3, 10*time.Second, 300*time.Millisecond) {
		if code, _ := errorReply(t, m); code != "403" {
			t.Errorf("beta listing alpha: %s", code)
		}
	}
	// Stopping: 403 with alpha in the body, "not found" with beta.
	for _, m := range collect(t, f.client, protocol.UndeploySubject("beta", wid), mustJSON(t, protocol.StopWorkloadRequest{Namespace: "alpha"}), 3, 10*time.Second, 300*time.Millisecond) {
		if code, _ := errorReply(t, m); code != "403" {
			t.Errorf("beta stopping alpha: %s", code)
		}
	}
	for _, m := range collect(t, f.client, protocol.UndeploySubject("beta", wid), mustJSON(t, protocol.StopWorkloadRequest{Namespace: "beta"}), 3, 10*time.Second, 300*time.Millisecond) {
		var r protocol.StopWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil || r.Stopped {
			t.Errorf("beta stop reply %q", m.Data)
		}
	}
	if agents[0].workloadCount() != 1 {
		t.Fatal("beta stopped alpha's workload")
	}
	// Clone as beta: silence, even though the nexlet hands out any namespace.
	if got := collect(t, f.client, protocol.CloneSubject("beta", wid), mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "beta", NewTargetXKey: "X"}), 0, 5*time.Second, 1500*time.Millisecond); len(got) != 0 {
		t.Fatalf("beta cloned alpha's workload: %q", got[0].Data)
	}
	// System sees and clones everything.
	if got := collect(t, f.client, protocol.CloneSubject("system", wid), mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "system", NewTargetXKey: "X"}), 1, 10*time.Second, 300*time.Millisecond); len(got) != 1 {
		t.Fatalf("system clone: %d replies", len(got))
	}
	n := 0
	for _, m := range collect(t, f.client, protocol.WPingSubject("system"), mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: "system", Filter: []string{}}), 3, 10*time.Second, 300*time.Millisecond) {
		var ws []protocol.WorkloadSummary
		_ = json.Unmarshal(m.Data, &ws)
		n += len(ws)
	}
	if n != 2 {
		t.Errorf("system sees %d workloads, want 2", n)
	}
	// System stops it with the owning namespace in the body.
	stopped := false
	for _, m := range collect(t, f.client, protocol.UndeploySubject("system", wid), mustJSON(t, protocol.StopWorkloadRequest{Namespace: "alpha"}), 3, 10*time.Second, 300*time.Millisecond) {
		var r protocol.StopWorkloadResponse
		_ = protocol.Decode(m.Data, &r)
		stopped = stopped || r.Stopped
	}
	if !stopped {
		t.Error("system could not stop alpha's workload")
	}
}

// slowDeleteStore is a store whose deletes take a while (a JetStream KV round trip under
// load): a refusal sent before its record is gone shows up as a stored record.
type slowDeleteStore struct {
	*MemStore
	delay time.Duration
}

func (s slowDeleteStore) Delete(ctx context.Context, workloadType, workloadID string) error {
	time.Sleep(s.delay)
	return s.MemStore.Delete(ctx, workloadType, workloadID)
}

// TestDeployRefusals: every refusal says "not started" and leaves nothing behind, in
// the store either: a refused deploy's record is deleted before the refusal is sent,
// so a nexd that dies right after it cannot replay the deploy.
func TestDeployRefusals(t *testing.T) {
	st := &MemStore{MaxValueBytes: 600}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = slowDeleteStore{MemStore: st, delay: 300 * time.Millisecond} })
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	deploy := func(req any) *nats.Msg {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		if len(bids) != 1 {
			t.Fatal("no bid")
		}
		return request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	}
	tests := []struct {
		name     string
		req      any
		code     string
		contains string
	}{
		{"schema: missing required", startReq("tenant", "w", `{"n":1}`), "400", "cmd"},
		{"schema: wrong type", startReq("tenant", "w", `{"cmd":5}`), "400", "run_request"},
		{"run_request not JSON", startReq("tenant", "w", `{cmd`), "400", "not valid JSON"},
		{"unknown type", func() protocol.StartWorkloadRequest {
			r := startReq("tenant", "w", `{"cmd":"x"}`)
			r.WorkloadType = "wasm"
			return r
		}(), "404", "workload type not found"},
		{"unsupported lifecycle", func() protocol.StartWorkloadRequest {
			r := startReq("tenant", "w", `{"cmd":"x"}`)
			r.WorkloadLifecycle = protocol.LifecycleFunction
			return r
		}(), "400", "lifecycle"},
		{"bad lifecycle", strings.Replace(string(mustJSON(t, startReq("tenant", "w", `{"cmd":"x"}`))), `"service"`, `"forever"`, 1), "400", "workload_lifecycle"},
		{"missing key", `{"name":"w"}`, "400", "missing"},
		{"too big to store", func() protocol.StartWorkloadRequest {
			return startReq("tenant", "w", `{"cmd":"`+strings.Repeat("x", 700)+`"}`)
		}(), "400", "workload not started: its start request cannot be recorded"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := deploy(tc.req)
			code, body := errorReply(t, m)
			if code != tc.code || !strings.Contains(body.Error, tc.contains) {
				t.Errorf("got %s %q, want %s containing %q", code, body.Error, tc.code, tc.contains)
			}
			if m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
				t.Errorf("refusal does not say %q", protocol.DeployNotStarted)
			}
		})
	}
	a.mu.Lock()
	starts := a.starts
	a.mu.Unlock()
	if st.Len() != 0 || a.workloadCount() != 0 || starts != 0 {
		t.Errorf("refused deploys left state or reached the nexlet: store %d, running %d, start requests %d", st.Len(), a.workloadCount(), starts)
	}
	// A nexlet's refusal is relayed verbatim and not stored.
	a.mu.Lock()
	a.failStart = "artifact not found"
	a.mu.Unlock()
	m := deploy(startReq("tenant", "w", `{"cmd":"x"}`))
	if m.Header.Get(protocol.HeaderErrorCode) != "100" || m.Header.Get(protocol.HeaderError) != "artifact not found" ||
		m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted {
		t.Errorf("nexlet error not relayed: %v %q", m.Header, m.Data)
	}
	if st.Len() != 0 {
		t.Error("failed start was stored")
	}
}

// failDeleteStore is a store that cannot delete (KV down after the put).
type failDeleteStore struct{ *MemStore }

func (failDeleteStore) Delete(context.Context, string, string) error {
	return errors.New("kv: delete failed: connection closed")
}

// TestRefusedDeployWhoseRecordStays: when a refused deploy's record cannot be removed
// from node state, the node does not answer "not started" (its next process would
// replay the record and start the workload): it says the outcome is unknown and why.
func TestRefusedDeployWhoseRecordStays(t *testing.T) {
	st := &MemStore{}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = failDeleteStore{st} })
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	a.mu.Lock()
	a.failStart = "artifact not found"
	a.mu.Unlock()
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "w", `{"cmd":"x"}`))
	if st.Len() != 1 {
		t.Fatalf("store holds %d records, want the one it could not delete", st.Len())
	}
	if got := m.Header.Get(protocol.HeaderDeployOutcome); got == protocol.DeployNotStarted {
		t.Fatalf("the reply says %q while the record stays to be replayed: %v", got, m.Header)
	}
	// A store failure is an internal error: its details go to the node's log (with
	// the reply's error id), the reply says what the client must know.
	if code, desc := m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError); code != "500" || desc != "outcome of the start unknown" {
		t.Errorf("got %s %q, want 500 %q", code, desc, "outcome of the start unknown")
	}
}

// TestHealthTransitions: a nexlet's health follows its heartbeats' state, and its
// silence degrades it, takes it offline and then removes it (AGENTSTOPPED), each change
// reported once (AGENTHEALTHCHANGED), none skipped. The silence is the test's, not the
// machine's: the timeouts are far longer than the test runs, and the nexlet's last
// heartbeat is dated back (silentFor) into each window in turn. Before, with windows of
// 500 and 600 ms polled by the test, a loaded machine could let one pass unseen.
func TestHealthTransitions(t *testing.T) {
	const degradedAfter, offlineAfter, removeAfter = 10 * time.Minute, 20 * time.Minute, 10 * time.Minute
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.DegradedAfter = degradedAfter
		o.OfflineAfter = offlineAfter
		o.RemoveOfflineAfter = removeAfter
		o.Emitter = NATSEmitter{NC: o.NC}
	})
	n := f.nodes[0]
	events, err := f.client.SubscribeSync(protocol.EventSubject(n.ID(), protocol.EventAgentStopped))
	if err != nil {
		t.Fatal(err)
	}
	started, _ := f.client.SubscribeSync(protocol.EventSubject(n.ID(), protocol.EventAgentStarted))
	var (
		mu      sync.Mutex
		changes []string // "from>to", in the order the node emitted them
	)
	if _, err := f.client.Subscribe(protocol.EventSubject(n.ID(), protocol.EventAgentHealthChanged), func(m *nats.Msg) {
		var ev protocol.AgentHealthChangedEvent
		var c string
		if err := json.Unmarshal(m.Data, &ev); err != nil || ev.ID != "agent0" {
			c = string(m.Data) // not agent0's: fails the comparison below
		} else {
			c = ev.From + ">" + ev.To
		}
		mu.Lock()
		changes = append(changes, c)
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	_ = f.client.Flush()
	reported := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(changes)
	}
	a := f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	if _, err := started.NextMsg(10 * time.Second); err != nil {
		t.Fatalf("no AGENTSTARTED: %v", err)
	}
	health := func() string {
		for _, ai := range n.Agents() {
			if ai.ID == "agent0" {
				return ai.Health
			}
		}
		return "removed"
	}
	// State from heartbeats.
	a.mu.Lock()
	a.hbState = "lameduck"
	a.mu.Unlock()
	testkit.Eventually(t, "shutting down", func() bool { return health() == protocol.HealthShuttingDown })
	a.mu.Lock()
	a.hbState = "starting"
	a.mu.Unlock()
	testkit.Eventually(t, "degraded by state", func() bool { return health() == protocol.HealthDegraded })
	a.mu.Lock()
	a.hbState = "running"
	a.mu.Unlock()
	testkit.Eventually(t, "healthy again", func() bool { return health() == protocol.HealthHealthy })

	// Silence: degraded, offline, removed. The heartbeats sent are all handled (one
	// subscription, in order) once a last one, marked, is; nothing dates the last word
	// forward after that.
	a.stopHeartbeats()
	mark := time.Unix(1, 0).UTC()
	b, _ := json.Marshal(protocol.AgentHeartbeat{Data: "{}", Summary: protocol.AgentSummary{
		Name: "go_exec", Type: "native", State: "running", Version: a.req.Version, StartTime: mark}})
	if err := a.nc.Publish(protocol.AgentHeartbeatSubject(n.ID(), "agent0"), b); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the last heartbeat handled", func() bool {
		for _, ai := range n.Agents() {
			if ai.ID == "agent0" && ai.Summary.StartTime.Equal(mark) {
				return true
			}
		}
		return false
	})
	silentFor := func(d time.Duration) {
		n.mu.Lock()
		defer n.mu.Unlock()
		if r := n.agents["agent0"]; r != nil {
			r.lastSeen = time.Now().Add(-d)
			r.lastBeat = r.lastSeen
		}
	}
	for _, step := range []struct {
		silence time.Duration
		want    string
	}{
		{(degradedAfter + offlineAfter) / 2, protocol.HealthDegraded},
		{offlineAfter + removeAfter/2, protocol.HealthOffline},
		{offlineAfter + removeAfter + time.Minute, "removed"},
	} {
		silentFor(step.silence)
		// The node's sweep (every HealthTick) reports the change, or removes it.
		testkit.Eventually(t, "the sweep's report of "+step.want, func() bool {
			c := reported()
			return step.want == "removed" && health() == "removed" ||
				len(c) > 0 && strings.HasSuffix(c[len(c)-1], ">"+step.want)
		})
		if h := health(); h != step.want {
			t.Fatalf("silent for %v: %s, want %s", step.silence, h, step.want)
		}
	}
	m, err := events.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no AGENTSTOPPED: %v", err)
	}
	var ev protocol.AgentStoppedEvent
	if err := json.Unmarshal(m.Data, &ev); err != nil || ev.ID != "agent0" || !strings.Contains(ev.Reason, "offline") {
		t.Errorf("event %q %v", m.Data, err)
	}
	const (
		unknown, healthy, degraded = protocol.HealthUnknown, protocol.HealthHealthy, protocol.HealthDegraded
		shuttingDown, offline      = protocol.HealthShuttingDown, protocol.HealthOffline
	)
	want := []string{unknown + ">" + healthy, healthy + ">" + shuttingDown, shuttingDown + ">" + degraded,
		degraded + ">" + healthy, healthy + ">" + degraded, degraded + ">" + offline}
	if got := reported(); !slices.Equal(got, want) {
		t.Errorf("health changes reported %v, want %v", got, want)
	}
	if n.Ping().AgentCount != 0 {
		t.Errorf("agent_count = %d after removal", n.Ping().AgentCount)
	}
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 0); len(got) != 0 {
		t.Error("bid without a live nexlet")
	}
}

func TestRegistration(t *testing.T) {
	t.Run("remote on", func(t *testing.T) {
		key, _ := nkeys.CreateUser()
		pub, _ := key.PublicKey()
		f := newFixture(t, 3, func(_ int, o *Options) {
			o.AllowRemoteRegistration = true
			o.RemoteNexlets = []RemoteNexlet{{Name: "remote", Type: "native", PublicKey: pub}}
		})
		msgs := collect(t, f.client, protocol.RemoteRegisterSubject("testnexus"), []byte(`{}`), 1, 10*time.Second, 500*time.Millisecond)
		if len(msgs) != 1 {
			t.Fatalf("RREGISTER replies: %d, want exactly one (queue group = nexus)", len(msgs))
		}
		var rr protocol.RegisterRemoteAgentResponse
		if err := protocol.Decode(msgs[0].Data, &rr); err != nil || rr.RegistrationCreds == nil {
			t.Fatalf("RREGISTER %q: %v", msgs[0].Data, err)
		}
		if rr.RegistrationCreds.ConnName != "register-"+rr.AssignedAgentID {
			t.Errorf("creds = %+v", rr.RegistrationCreds)
		}
		var target *Node
		for _, n := range f.nodes {
			if n.ID() == rr.RespondTo {
				target = n
			}
		}
		if target == nil {
			t.Fatalf("respond_to %q is no node", rr.RespondTo)
		}
		a := newFakeAgent(t, f.srv, rr.RespondTo, rr.AssignedAgentID, "remote", "native")
		a.key = key
		a.mustRegister()
		if a.resp.ConnectionData.ConnName != "agent-"+rr.AssignedAgentID || a.resp.NodeID != target.ID() || !a.resp.Success {
			t.Errorf("register reply %+v", a.resp)
		}
		if m := request(t, f.client, protocol.RemoteRegisterSubject("testnexus"), `[1,2]`); m.Header.Get(protocol.HeaderErrorCode) != "400" {
			t.Errorf("malformed RREGISTER: %q", m.Data)
		}
	})
	t.Run("remote on without issuer", func(t *testing.T) {
		f := newFixture(t, 1, func(_ int, o *Options) {
			o.AllowRemoteRegistration = true
			o.Minter = testMinter{url: "nats://x"}
		})
		code, body := errorReply(t, request(t, f.client, protocol.RemoteRegisterSubject("testnexus"), `{}`))
		if code != "403" || !strings.Contains(body.Error, "issuer_signing_key") {
			t.Errorf("got %s %q", code, body.Error)
		}
	})
	t.Run("remote off", func(t *testing.T) {
		f := newFixture(t, 3, nil)
		if _, err := f.client.Request(protocol.RemoteRegisterSubject("testnexus"), []byte(`{}`), 2*time.Second); err != nats.ErrNoResponders {
			t.Errorf("RREGISTER without the option: %v", err)
		}
		a := newFakeAgent(t, f.srv, f.nodes[0].ID(), "stranger", "x", "native")
		code, body := errorReply(t, a.register())
		if code != "403" || !strings.Contains(body.Error, "remote registration is disabled") {
			t.Errorf("unassigned id: %s %q", code, body.Error)
		}
		if f.nodes[0].Ping().AgentCount != 0 {
			t.Error("refused nexlet counted")
		}
	})
}

func TestReRegistrationAndReplay(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) { o.Emitter = NATSEmitter{NC: o.NC} })
	n := f.nodes[0]
	a := f.healthyAgent(n, "first", "go_exec", "native", nil)
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "keep", `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil {
		t.Fatalf("deploy %q", m.Data)
	}
	// Another type's entry must not be replayed to native (exact type match).
	_ = f.stores[0].Put(context.Background(), "nativeX", "other", startReq("tenant", "o", `{}`))
	stopped, _ := f.client.SubscribeSync(protocol.EventSubject(n.ID(), protocol.EventAgentStopped))
	_ = f.client.Flush()

	// The nexlet restarts under a new id: the old registration goes, the workload comes back.
	a.kill()
	n.RemoveAgent("first", "exited; replaced by its restart") // the supervisor's part
	b := f.healthyAgent(n, "second", "go_exec", "native", nil)
	if got := n.Agents(); len(got) != 1 || got[0].ID != "second" {
		t.Fatalf("agents = %+v", got)
	}
	ex, ok := b.resp.ExistingState[started.ID]
	if !ok || len(b.resp.ExistingState) != 1 || ex.Request.Name != "keep" || ex.WorkloadCreds.ConnName != "workload-tenant-"+started.ID {
		t.Fatalf("existing_state = %+v", b.resp.ExistingState)
	}
	if m, err := stopped.NextMsg(10 * time.Second); err != nil || !strings.Contains(string(m.Data), "replaced") {
		t.Errorf("AGENTSTOPPED for the replaced registration: %v", err)
	}
	// WaitForAgents and RemoveAgent.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if missing := n.WaitForAgents(ctx, []string{"second"}); len(missing) != 0 {
		t.Errorf("missing %v", missing)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if missing := n.WaitForAgents(short, []string{"second", "wasm", "go_exec"}); !slices.Equal(missing, []string{"wasm", "go_exec"}) {
		t.Errorf("missing %v", missing)
	}
	if err := n.StopAllWorkloads(ctx); err != nil || b.workloadCount() != 0 {
		t.Errorf("StopAllWorkloads: %v, %d left", err, b.workloadCount())
	}
	// Shutdown keeps the state (the stop events are ignored) so a restart replays it.
	_ = b.nc.Flush()
	time.Sleep(300 * time.Millisecond)
	if got, _ := f.stores[0].ByType(ctx, "native"); len(got) != 1 {
		t.Errorf("state after StopAllWorkloads = %v", got)
	}
	n.RemoveAgent("second", "exited with status 1")
	if n.Ping().AgentCount != 0 {
		t.Error("RemoveAgent left the registration")
	}
}

func TestEnterLameduckLocal(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	until, err := n.EnterLameduck(time.Minute)
	if err != nil || time.Until(until) <= 0 {
		t.Fatalf("EnterLameduck: %v %v", until, err)
	}
	again, _ := n.EnterLameduck(time.Second)
	if !again.Equal(until) {
		t.Error("second EnterLameduck moved the deadline")
	}
	if n.Tags()[protocol.TagLameduck] != "true" {
		t.Error("lameduck tag not set")
	}
	if _, err := n.EnterLameduck(-time.Second); err == nil {
		t.Error("negative delay accepted")
	}
}

func TestEndedWorkloadLeavesState(t *testing.T) {
	f := newFixture(t, 2, nil)
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	f.healthyAgent(f.nodes[1], "agent1", "go_exec", "native", nil)
	var ids []string
	for _, name := range []string{"job1", "job2"} {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{protocol.TagNode: "node-0"}}, 1)
		m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", name, `{"cmd":"x"}`))
		var r protocol.StartWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil {
			t.Fatalf("deploy %q", m.Data)
		}
		ids = append(ids, r.ID)
	}
	// Another node's store is not touched by our events.
	_ = f.stores[1].Put(context.Background(), "native", ids[0], startReq("tenant", "foreign", `{}`))
	a.finish(ids[0])
	testkit.Eventually(t, "finished job removed from state", func() bool { return f.stores[0].Len() == 1 })
	if f.stores[1].Len() != 1 {
		t.Error("another node dropped state for a workload it does not run")
	}
	got, _ := f.stores[0].ByType(context.Background(), "native")
	if _, ok := got[ids[1]]; !ok {
		t.Errorf("the running job left state: %v", got)
	}
}

// TestJobEndingBeforeDeployReplyLeavesNoState: a job that ends before the node has
// recorded it must not stay in state (its WORKLOADSTOPPED arrives first).
func TestJobEndingBeforeDeployReplyLeavesNoState(t *testing.T) {
	f := newFixture(t, 1, nil)
	f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", func(a *fakeAgent) { a.endFirst = true })
	for i := 0; i < 20; i++ {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "quick", `{"cmd":"x"}`))
		var r protocol.StartWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil {
			t.Fatalf("deploy %q", m.Data)
		}
	}
	testkit.Eventually(t, "quick jobs gone from state", func() bool { return f.stores[0].Len() == 0 })
	time.Sleep(200 * time.Millisecond)
	if n := f.stores[0].Len(); n != 0 {
		t.Fatalf("%d ended jobs left in state", n)
	}
}

// TestDeploySlowStart: a nexlet that reports progress is waited for past the silence
// bound (StartTimeout) up to DeployTimeout; one that stays silent past StartTimeout is
// given up on, stopped again, and the client hears "not started" with nothing left
// running or recorded.
func TestDeploySlowStart(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = &MemStore{}
		o.StartTimeout = 300 * time.Millisecond
		o.DeployTimeout = 5 * time.Second
		o.ProgressInterval = 50 * time.Millisecond
	})
	st := f.nodes[0].o.Store.(*MemStore)
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	deploy := func() *nats.Msg {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		if len(bids) != 1 {
			t.Fatal("no bid")
		}
		m, err := f.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), mustJSON(t, startReq("tenant", "w", `{"cmd":"x"}`)), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}

	a.mu.Lock()
	a.startDelay, a.progress = time.Second, true
	a.mu.Unlock()
	if m := deploy(); isErrorReply(m) {
		t.Fatalf("slow start with progress refused: %v %s", m.Header, m.Data)
	}
	if st.Len() != 1 || a.workloadCount() != 1 {
		t.Fatalf("after a slow start: store %d, running %d; want 1 and 1", st.Len(), a.workloadCount())
	}

	a.mu.Lock()
	a.startDelay, a.progress = time.Second, false
	a.mu.Unlock()
	m := deploy()
	code, body := errorReply(t, m)
	if code != "408" || m.Header.Get(protocol.HeaderDeployOutcome) != protocol.DeployNotStarted || !strings.Contains(body.Error, "stopped it again") {
		t.Fatalf("silent start: got %s %q, outcome %q; want 408 not-started", code, body.Error, m.Header.Get(protocol.HeaderDeployOutcome))
	}
	time.Sleep(1500 * time.Millisecond) // the fake's late reply arrives and is ignored
	if st.Len() != 1 || a.workloadCount() != 1 {
		t.Fatalf("after a given-up start: store %d, running %d; want only the first workload", st.Len(), a.workloadCount())
	}
}

// TestAliveProbe: the liveness probe answers through the health loop and the node's
// lock, so a node stuck on its lock fails it (and the watchdog withholds its ping).
func TestAliveProbe(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := n.Alive(ctx); err != nil {
		t.Fatalf("a working node fails the probe: %v", err)
	}
	n.mu.Lock()
	stuck, cancelStuck := context.WithTimeout(t.Context(), 300*time.Millisecond)
	err := n.Alive(stuck)
	cancelStuck()
	n.mu.Unlock()
	if err == nil {
		t.Fatal("a node stuck on its lock passes the probe")
	}
	if err := n.Alive(ctx); err != nil {
		t.Fatalf("the probe fails after the lock is free again: %v", err)
	}
}

// TestDeployRelaysProgress: a client that asks (HeaderProgress on ADEPLOY) hears the
// nexlet's progress reports (text and byte counts) as body-less replies before the
// answer; one that does not
// ask gets only the answer, as upstream clients expect.
func TestDeployRelaysProgress(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = &MemStore{}
		o.DeployTimeout = 5 * time.Second
		o.ProgressInterval = 50 * time.Millisecond
	})
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	a.mu.Lock()
	a.startDelay, a.progress = 400*time.Millisecond, true
	a.mu.Unlock()
	var lastDone int64
	deploy := func(askProgress bool) (progress int, answer *nats.Msg) {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		if len(bids) != 1 {
			t.Fatal("no bid")
		}
		inbox := f.client.NewInbox()
		sub, err := f.client.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		m := &nats.Msg{Subject: protocol.DeploySubject("tenant", bids[0].BidderID), Reply: inbox,
			Data: mustJSON(t, startReq("tenant", "w", `{"cmd":"x"}`)), Header: nats.Header{}}
		if askProgress {
			m.Header.Set(protocol.HeaderProgress, "1")
		}
		if err := f.client.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		for {
			r, err := sub.NextMsg(10 * time.Second)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			if r.Header.Get(protocol.HeaderProgress) != "" && len(r.Data) == 0 {
				if r.Header.Get(protocol.HeaderProgress) != "starting" {
					t.Errorf("progress %q, want the nexlet's text", r.Header.Get(protocol.HeaderProgress))
				}
				done, total, ok := protocol.ParseProgressBytes(r.Header.Get(protocol.HeaderProgressBytes))
				if !ok || total != 1000 || done <= lastDone {
					t.Errorf("progress bytes %q after %d, want increasing counts of 1000", r.Header.Get(protocol.HeaderProgressBytes), lastDone)
				}
				lastDone = done
				progress++
				continue
			}
			return progress, r
		}
	}
	n, answer := deploy(true)
	if n == 0 || isErrorReply(answer) {
		t.Fatalf("asked for progress: %d reports, answer %v %s", n, answer.Header, answer.Data)
	}
	n, answer = deploy(false)
	if n != 0 || isErrorReply(answer) {
		t.Fatalf("did not ask: %d reports, answer %v %s", n, answer.Header, answer.Data)
	}
}

// TestDeployKeepAlive: a client that asks (HeaderAlive on ADEPLOY) hears body-less
// keep-alives from the node holding its deploy, the first at once and then at its
// interval until the answer, so it can tell a slow start from a node gone away; one
// that does not ask hears none.
func TestDeployKeepAlive(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = &MemStore{}
		o.DeployTimeout = 5 * time.Second
	})
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	a.mu.Lock()
	a.startDelay = 600 * time.Millisecond
	a.mu.Unlock()
	deploy := func(alive string) (alives int, answer *nats.Msg) {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		if len(bids) != 1 {
			t.Fatal("no bid")
		}
		inbox := f.client.NewInbox()
		sub, err := f.client.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		m := &nats.Msg{Subject: protocol.DeploySubject("tenant", bids[0].BidderID), Reply: inbox,
			Data: mustJSON(t, startReq("tenant", "w", `{"cmd":"x"}`)), Header: nats.Header{}}
		if alive != "" {
			m.Header.Set(protocol.HeaderAlive, alive)
		}
		if err := f.client.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		for {
			r, err := sub.NextMsg(10 * time.Second)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			if r.Header.Get(protocol.HeaderAlive) != "" && len(r.Data) == 0 {
				alives++
				continue
			}
			return alives, r
		}
	}
	n, answer := deploy("100ms")
	if n < 3 || isErrorReply(answer) {
		t.Fatalf("asked for keep-alives every 100ms of a 600ms start: %d, answer %v %s", n, answer.Header, answer.Data)
	}
	n, answer = deploy("")
	if n != 0 || isErrorReply(answer) {
		t.Fatalf("did not ask: %d keep-alives, answer %v %s", n, answer.Header, answer.Data)
	}
}

// TestWPingResources: a WPING that names this node (protocol.HeaderResources) gets
// each workload's cgroup figures from the hook; one that names another node, or none,
// gets the plain listing upstream clients know.
func TestWPingResources(t *testing.T) {
	f := newFixture(t, 2, func(i int, o *Options) {
		o.WorkloadResources = func(id string) (protocol.WorkloadResources, bool) {
			return protocol.WorkloadResources{CPUUsageNsec: 7e9, MemoryBytes: 3 << 20, MemoryMax: 512 << 20, OOMKills: i}, true
		}
	})
	f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatal("no bid")
	}
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "w", `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil {
		t.Fatalf("deploy %q", m.Data)
	}
	list := func(want string) (out []protocol.WorkloadSummary) {
		inbox := f.client.NewInbox()
		sub, err := f.client.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		req := &nats.Msg{Subject: protocol.WPingSubject(protocol.SystemNamespace), Reply: inbox, Header: nats.Header{},
			Data: mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})}
		if want != "" {
			req.Header.Set(protocol.HeaderResources, want)
		}
		if err := f.client.PublishMsg(req); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			r, err := sub.NextMsg(10 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			var ws []protocol.WorkloadSummary
			if err := json.Unmarshal(r.Data, &ws); err != nil {
				t.Fatalf("%q: %v", r.Data, err)
			}
			out = append(out, ws...)
		}
		return out
	}
	ws := list(f.nodes[0].ID())
	if len(ws) != 1 || ws[0].ID != started.ID || ws[0].Resources == nil || *ws[0].Resources !=
		(protocol.WorkloadResources{CPUUsageNsec: 7e9, MemoryBytes: 3 << 20, MemoryMax: 512 << 20}) {
		t.Fatalf("asked this node: %+v", ws)
	}
	for _, other := range []string{f.nodes[1].ID(), ""} {
		ws := list(other)
		if len(ws) != 1 || ws[0].Resources != nil {
			t.Fatalf("asked %q: %+v", other, ws)
		}
		b, _ := json.Marshal(ws[0])
		if strings.Contains(string(b), "resources") {
			t.Errorf("plain listing carries resources: %s", b)
		}
	}
}

// TestWorkloadChangesMove: the counter a status poller keys its cached listing on moves
// with a deploy, a workload's end and a stop, and stands still while heartbeats report
// the same workloads.
func TestWorkloadChangesMove(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	a := f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	deploy := func(name string) string {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", name, `{"cmd":"x"}`))
		var r protocol.StartWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil || r.ID == "" {
			t.Fatalf("deploy %q", m.Data)
		}
		return r.ID
	}
	moved := func(what string, before uint64) uint64 {
		t.Helper()
		testkit.Eventually(t, what+" moves the counter", func() bool { return n.WorkloadChanges() != before })
		return n.WorkloadChanges()
	}
	c := n.WorkloadChanges()
	job := deploy("job1")
	c = moved("a deploy", c)
	svc := deploy("svc1")
	moved("a second deploy", c)
	// Settled: heartbeats (every 100 ms here) report the same two workloads.
	testkit.Eventually(t, "the counter settles", func() bool {
		before := n.WorkloadChanges()
		time.Sleep(350 * time.Millisecond)
		return n.WorkloadChanges() == before
	})
	c = n.WorkloadChanges()
	a.finish(job)
	c = moved("a job's end", c)
	request(t, f.client, protocol.UndeploySubject("tenant", svc), protocol.StopWorkloadRequest{Namespace: "tenant"})
	moved("a stop", c)
}

// TestHoldsNothing: the listing is known empty without asking only while every
// expected nexlet registered saying it holds nothing and nothing changed since; a
// nexlet holding workloads, one that does not say, one not registered yet, a deploy
// and remote registration each make the node ask.
func TestHoldsNothing(t *testing.T) {
	holds := func(ids *[]string) func(*fakeAgent) {
		return func(a *fakeAgent) { a.req.Workloads = ids }
	}
	f := newFixture(t, 4, func(i int, o *Options) { o.AllowRemoteRegistration = i == 3 })
	empty, one := &[]string{}, &[]string{"w1"}

	n := f.nodes[0]
	n.ExpectAgent("agent0", "go_exec")
	if n.HoldsNothing(n.WorkloadChanges()) {
		t.Fatal("holds nothing before the expected nexlet registered")
	}
	// As READY reads it: the moment the registration is visible, before its reply.
	seen := make(chan bool, 1)
	go func() {
		if missing := n.WaitForAgents(context.Background(), []string{"agent0"}); len(missing) > 0 {
			seen <- false
			return
		}
		seen <- n.HoldsNothing(n.WorkloadChanges())
	}()
	f.healthyAgent(n, "agent0", "go_exec", "native", holds(empty))
	if !<-seen {
		t.Fatal("not known empty as the registration became visible")
	}
	if !n.HoldsNothing(n.WorkloadChanges()) {
		t.Fatal("not known empty after a registration that holds nothing")
	}
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "svc", `{"cmd":"x"}`))
	if n.HoldsNothing(n.WorkloadChanges()) {
		t.Fatal("known empty after a deploy")
	}

	for i, ids := range map[int]*[]string{1: one, 2: nil, 3: empty} {
		n := f.nodes[i]
		f.healthyAgent(n, "agent0", "go_exec", "native", holds(ids))
		if n.HoldsNothing(n.WorkloadChanges()) {
			t.Errorf("node %d (held %v, remote registration %v): known empty", i, ids, i == 3)
		}
	}
}

// TestRepeatStopOfAWorkloadRunningAgain: a stop a nexlet confirmed is remembered so a
// repeat is answered "already stopped at T". But the workload can run again under its
// id: its removal from node state failed (a JetStream timeout is only logged), and the
// nexlet's next registration (a crash, a restart) had it replayed. A stop then must
// reach the nexlet that runs it, and the node must not forget a workload that runs.
// Before, the memory answered "already stopped" for an hour without asking a nexlet,
// and the node then removed the running workload from its state.
func TestRepeatStopOfAWorkloadRunningAgain(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	a := f.healthyAgent(n, "first", "go_exec", "native", nil)
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	req := startReq("tenant", "again", `{"cmd":"x"}`)
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy %q: %v", m.Data, err)
	}
	wid := started.ID
	stored, _ := f.stores[0].ByType(t.Context(), "native")
	rec := stored[wid]
	stop := func() protocol.StopWorkloadResponse {
		t.Helper()
		var r protocol.StopWorkloadResponse
		m := request(t, f.client, protocol.UndeploySubject("tenant", wid), protocol.StopWorkloadRequest{Namespace: "tenant"})
		if err := protocol.Decode(m.Data, &r); err != nil {
			t.Fatalf("stop reply %q: %v", m.Data, err)
		}
		return r
	}
	if r := stop(); !r.Stopped || r.AlreadyStoppedAt != "" {
		t.Fatalf("first stop: %+v", r)
	}
	// Its removal from node state failed: the record is still there.
	if err := f.stores[0].Put(t.Context(), "native", wid, rec); err != nil {
		t.Fatal(err)
	}
	// The nexlet restarts; the replay runs the workload again.
	a.kill()
	n.RemoveAgent("first", "exited; replaced by its restart")
	b := f.healthyAgent(n, "second", "go_exec", "native", nil)
	ex, ok := b.resp.ExistingState[wid]
	if !ok {
		t.Fatalf("not replayed: %+v", b.resp.ExistingState)
	}
	b.mu.Lock()
	b.workloads[wid] = ex.Request // it runs
	b.mu.Unlock()

	r := stop()
	b.mu.Lock()
	_, runs := b.workloads[wid]
	b.mu.Unlock()
	if runs || !r.Stopped || r.AlreadyStoppedAt != "" {
		t.Errorf("stop of the running workload answered %+v; still running on its nexlet: %v", r, runs)
	}
	if runs { // the node removes what it stopped after the reply: give it that moment
		for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if left, _ := f.stores[0].ByType(t.Context(), "native"); left[wid].Name == "" {
				t.Error("the node forgot a workload that still runs")
				break
			}
		}
	}
}

// slowDelete is a node store whose removals take a while (a state store under load).
type slowDelete struct {
	Store
	wait time.Duration
}

func (s slowDelete) Delete(ctx context.Context, typ, id string) error {
	time.Sleep(s.wait)
	return s.Store.Delete(ctx, typ, id)
}

// TestStopAnsweredOutOfState: when a stop's answer arrives, the workload is already
// out of node state (here a removal takes 200 ms), so a nexd killed right after
// answering does not replay (and run again) the workload it said it stopped (e2e
// TestAnsweredStopStaysStoppedAcrossKills kills the real processes there). Before, the
// record was removed after the answer: still there when the answer arrived.
func TestStopAnsweredOutOfState(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = slowDelete{Store: o.Store, wait: 200 * time.Millisecond} })
	n := f.nodes[0]
	f.healthyAgent(n, "first", "go_exec", "native", nil)
	for i := range 3 {
		bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
		m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "w"+strconv.Itoa(i), `{"cmd":"x"}`))
		var started protocol.StartWorkloadResponse
		if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
			t.Fatalf("deploy %q: %v", m.Data, err)
		}
		m = request(t, f.client, protocol.UndeploySubject("tenant", started.ID), protocol.StopWorkloadRequest{Namespace: "tenant"})
		stored, err := f.stores[0].ByType(t.Context(), "native")
		if err != nil {
			t.Fatal(err)
		}
		var r protocol.StopWorkloadResponse
		if err := protocol.Decode(m.Data, &r); err != nil || !r.Stopped {
			t.Fatalf("stop reply %q: %v", m.Data, err)
		}
		if _, ok := stored[started.ID]; ok {
			t.Fatalf("stop %d answered while the workload was still in node state", i)
		}
	}
}

// A heartbeat the nexlet took before it had a start does not free the start's place:
// before, a heartbeat during a slow start reset the count, and a full nexlet bid.
func TestHeartbeatKeepsStartInFlight(t *testing.T) {
	f := newFixture(t, 1, nil)
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", func(a *fakeAgent) {
		a.req.MaxWorkloads = 1
		a.hbEvery = 20 * time.Millisecond
		a.startDelay, a.heldUntilAnswer = 2*time.Second, true
	})
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("bids = %+v", bids)
	}
	deployed := make(chan *nats.Msg, 1)
	go func() {
		m, _ := f.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), mustJSON(t, startReq("tenant", "w1", `{"cmd":"x"}`)), 10*time.Second)
		deployed <- m
	}()
	testkit.Eventually(t, "the nexlet to have the start", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.starts == 1
	})
	had := time.Now()
	testkit.Eventually(t, "a heartbeat while the start is held", func() bool {
		return f.nodes[0].Agents()[0].LastHeartbeat.After(had)
	})
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 0); len(got) != 0 {
		t.Fatalf("a nexlet full with a start in flight bid after a heartbeat: %+v", got)
	}
	if m := <-deployed; m == nil || m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("deploy: %v", m)
	}
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 0); len(got) != 0 {
		t.Fatalf("a full nexlet bid after its start: %+v", got)
	}
}

// TestStaleHeartbeatAfterStart: a nexlet's heartbeat and its answer to a start travel
// apart (NATS subjects the node reads on separate goroutines), so a heartbeat taken
// before the nexlet had the start may be handled after the node kept it. Such a
// heartbeat does not count the start, and the node must not forget it: a nexlet at
// max_workloads then bid again and could be given more than its max.
func TestStaleHeartbeatAfterStart(t *testing.T) {
	f := newFixture(t, 1, nil)
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", func(a *fakeAgent) {
		a.req.MaxWorkloads = 1
		a.hbEvery = time.Hour // the test sends the heartbeat that matters
	})
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("bids = %+v", bids)
	}
	m, err := f.client.Request(protocol.DeploySubject("tenant", bids[0].BidderID), mustJSON(t, startReq("tenant", "w1", `{"cmd":"x"}`)), 10*time.Second)
	if err != nil || m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("deploy: %v %v", m, err)
	}
	// The heartbeat the nexlet took before the start (no workloads), handled now.
	had := time.Now()
	b, _ := json.Marshal(protocol.AgentHeartbeat{Data: "{}", Summary: protocol.AgentSummary{
		Name: a.req.Name, Type: a.req.RegisterType, State: "running", Version: a.req.Version,
		SupportedLifecycles: "service,job", StartTime: time.Now().UTC()}})
	if err := f.client.Publish(protocol.AgentHeartbeatSubject(f.nodes[0].ID(), a.id), b); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the stale heartbeat handled", func() bool {
		return f.nodes[0].Agents()[0].LastHeartbeat.After(had)
	})
	if got := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 0); len(got) != 0 {
		t.Fatalf("a full nexlet bid after a heartbeat taken before its start: %+v", got)
	}
}
