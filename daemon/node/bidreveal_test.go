package node

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// TestWhatATenantsBidReveals pins what a bid tells a tenant (README Security, "What a
// bid reveals"): tenant B, as its own user on an operator-mode server, holds an
// auction on a node where tenant A runs three workloads. Its bid has upstream's four
// fields (bidder id, the nexlet's start request schema, lifecycles and xkey) and
// nexd's node id, node name, workload count and signature, nothing more; the count is
// the node's, A's three included; nothing names A's namespace, workloads or their
// names. A field added to bids fails here until the README says what it reveals.
func TestWhatATenantsBidReveals(t *testing.T) {
	rf := newRogueFixture(t)
	rf.minted("agent0", "go_exec", "native", nil)
	var aWids []string
	for _, name := range []string{"a-secret-one", "a-secret-two", "a-secret-three"} {
		aWids = append(aWids, deployAs(t, rf.client, "tenant-a", name))
	}
	b := rf.tenant("tenant-b")
	auction := func() []byte {
		bids := collect(t, b.nc, protocol.AuctionSubject("tenant-b"), mustJSON(t, protocol.AuctionRequest{AgentType: "native",
			AuctionID: "auction-b", Tags: map[string]string{}}), 1, 10*time.Second, 300*time.Millisecond)
		if len(bids) != 1 {
			t.Fatalf("tenant-b's auction: %d bids, want 1", len(bids))
		}
		return bids[0].Data
	}
	var body []byte
	// The count comes from the nexlet's heartbeats and the node's starts since: wait
	// for the three.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		body = auction()
		var bid protocol.AuctionResponse
		if err := protocol.Decode(body, &bid); err != nil {
			t.Fatalf("bid %s: %v", body, err)
		}
		if bid.WorkloadCount == len(aWids) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tenant-b's bid counts %d workloads, want the node's %d (tenant-a's)", bid.WorkloadCount, len(aWids))
		}
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		t.Fatal(err)
	}
	want := []string{"bidder_id", "nexd_node_id", "nexd_node_name", "nexd_sig", "nexd_workload_count",
		"start_request_schema", "supported_lifecycles", "xkey"}
	if got := slices.Sorted(maps.Keys(fields)); !slices.Equal(got, want) {
		t.Errorf("tenant-b's bid has fields %v, want %v: say in README Security what a new one reveals", got, want)
	}
	for _, secret := range append([]string{"tenant-a", "a-secret"}, aWids...) {
		if strings.Contains(string(body), secret) {
			t.Errorf("tenant-b's bid names %q: %s", secret, body)
		}
	}
}
