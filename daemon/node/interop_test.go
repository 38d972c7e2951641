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
