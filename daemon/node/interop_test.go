package node

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestUpstreamWorkloadStoppedEventLeavesState: upstream nexlets send WORKLOADSTOPPED
// with error.code as a JSON string ("3"). The node must still recognise the event and
// drop the ended job from its state (it used to fail to decode it and keep the job).
func TestUpstreamWorkloadStoppedEventLeavesState(t *testing.T) {
	f := newFixture(t, 1, nil)
	a := f.healthyAgent(f.nodes[0], "agent0", "go_exec", "native", nil)
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "native"}, 1)
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), startReq("tenant", "job", `{"cmd":"x"}`))
	var r protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &r); err != nil {
		t.Fatalf("deploy %q: %v", m.Data, err)
	}
	testkit.Eventually(t, "job recorded", func() bool { return f.stores[0].Len() == 1 })
	a.mu.Lock()
	delete(a.workloads, r.ID)
	a.mu.Unlock()
	for _, body := range []string{
		// Written from upstream's event shape: code is a string, message may be empty.
		`{"error":{"code":"3","message":""},"id":"` + r.ID + `","namespace":"tenant","workload_type":"native"}`,
	} {
		if err := a.nc.Publish(protocol.EventSubject("tenant", protocol.EventWorkloadStopped), []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, "ended job removed from state", func() bool { return f.stores[0].Len() == 0 })
}

// TestAgentStartedEventCarriesRegisterType: upstream decoders require register_type in
// AGENTSTARTED, so the node must send it.
func TestAgentStartedEventCarriesRegisterType(t *testing.T) {
	f := newFixture(t, 1, func(_ int, o *Options) { o.Emitter = NATSEmitter{NC: o.NC} })
	n := f.nodes[0]
	started, err := f.client.SubscribeSync(protocol.EventSubject(n.ID(), protocol.EventAgentStarted))
	if err != nil {
		t.Fatal(err)
	}
	_ = f.client.Flush()
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	m, err := started.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no AGENTSTARTED: %v", err)
	}
	var got map[string]any
	if err := json.Unmarshal(m.Data, &got); err != nil {
		t.Fatalf("AGENTSTARTED %q: %v", m.Data, err)
	}
	want := map[string]string{"id": "agent0", "name": "go_exec", "register_type": "native"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("AGENTSTARTED %s = %v, want %q (event %s)", k, got[k], v, m.Data)
		}
	}
}

// TestMixedNexletsListedOnce: a node with a nexd nexlet (asked on its own subject, and
// serving the shared one too, for upstream nodes) and one on upstream's SDK (asked on the
// shared subject). The nexd nexlet leaves the shared request alone (HeaderAskedDirect):
// each workload is listed once, and when the upstream one hangs it is named missing, no
// answer of the nexd nexlet's standing in for it by count. Stops and clones of either's
// workload are answered by the nexlet that runs it; before the header, the nexd nexlet
// took the shared stop of its workload first and its direct answer was "not found".
func TestMixedNexletsListedOnce(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	up := f.healthyAgent(n, "agent1", "upstream", "javascript", func(a *fakeAgent) { a.req.AnswersDirect = false })
	native := f.deployOne("tenant")
	bids := f.auction("tenant", protocol.AuctionRequest{AgentType: "javascript"}, 1)
	req := startReq("tenant", "js", `{"cmd":"x"}`)
	req.WorkloadType = "javascript"
	m := request(t, f.client, protocol.DeploySubject("tenant", bids[0].BidderID), req)
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy %q: %v", m.Data, err)
	}
	list := func() ([]protocol.WorkloadSummary, []protocol.MissingNexlet) {
		out, missing, err := n.queryWorkloads(t.Context(), protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace})
		if err != nil {
			t.Fatal(err)
		}
		return out, missing
	}
	out, missing := list()
	count := map[string]int{}
	for _, w := range out {
		count[w.ID]++
	}
	if len(out) != 2 || count[native] != 1 || count[started.ID] != 1 || len(missing) != 0 {
		t.Fatalf("list %+v, missing %+v: want %s and %s once each, nothing missing", out, missing, native, started.ID)
	}

	up.mute.Store(true)
	out, missing = list()
	if len(missing) != 1 || missing[0].ID != "agent1" || missing[0].Maybe || len(out) != 1 || out[0].ID != native {
		t.Errorf("upstream nexlet hung: list %+v, missing %+v: want %s alone and agent1 missing", out, missing, native)
	}
	up.mute.Store(false)

	for _, wid := range []string{native, started.ID} {
		c := collect(t, f.client, protocol.CloneSubject("tenant", wid), mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "tenant"}), 1, 10*time.Second, 300*time.Millisecond)
		if len(c) != 1 {
			t.Errorf("clone of %s: %d answers", wid, len(c))
		}
		m := request(t, f.client, protocol.UndeploySubject("tenant", wid), protocol.StopWorkloadRequest{Namespace: "tenant"})
		var resp protocol.StopWorkloadResponse
		if err := json.Unmarshal(m.Data, &resp); err != nil || !resp.Stopped {
			t.Errorf("stop of %s: %q (%v)", wid, m.Data, err)
		}
	}
}
