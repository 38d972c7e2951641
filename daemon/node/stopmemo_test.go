package node

import (
	"encoding/json"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// stopObserver records the outcomes Observer.Stop is told.
type stopObserver struct {
	mu    sync.Mutex
	stops []string
}

func (o *stopObserver) Auction(time.Duration)      {}
func (o *stopObserver) Deploy(time.Duration, bool) {}
func (o *stopObserver) WorkloadEnded(string)       {}
func (o *stopObserver) Stop(outcome string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stops = append(o.stops, outcome)
}

func (o *stopObserver) outcomes() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.stops)
}

// TestRepeatStopCounted: a repeated stop answered from the node's memory is counted as
// its own outcome (nexd_stops_total{outcome="already_stopped"}), beside stopped and
// not_found. Before, it was not counted at all.
func TestRepeatStopCounted(t *testing.T) {
	obs := &stopObserver{}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Observer = obs })
	n := f.nodes[0]
	f.healthyAgent(n, "first", "go_exec", "native", nil)
	wid := f.deployIn(t, "alpha", "web")
	for _, id := range []string{wid, wid, "NOSUCHWORKLOAD00000000"} {
		request(t, f.client, protocol.UndeploySubject("alpha", id), protocol.StopWorkloadRequest{Namespace: "alpha"})
	}
	// Counted, in any order: UNDEPLOY is handled async and the first stop is counted
	// after its reply, so the repeat (answered from memory) can be counted first.
	want := []string{StopAlreadyStopped, StopNotFound, StopStopped}
	testkit.Eventually(t, "three stop outcomes", func() bool {
		got := obs.outcomes()
		slices.Sort(got)
		return slices.Equal(got, want)
	})
}

// TestRecentStopsStayInTheirNamespace: a WPING carrying Nex-Stopped-Ref (nexctl
// workload stop by name or id prefix) gets the node's remembered stops that the
// reference names in the caller's namespace; system gets every namespace's. The
// attack: another namespace asks by the workload's name, a prefix of its id and its
// whole id, and learns nothing (no Nex-Stopped header). Each tenant asks as the NATS
// user an operator gives it (mint.TenantPermissions, an operator-mode server).
func TestRecentStopsStayInTheirNamespace(t *testing.T) {
	rf := newRogueFixture(t)
	rf.minted("first", "go_exec", "native", nil)
	wid := rf.deployIn(t, "alpha", "web")
	conns := map[string]*nats.Conn{"alpha": rf.tenant("alpha").nc, "beta": rf.tenant("beta").nc, protocol.SystemNamespace: rf.client}
	request(t, conns["alpha"], protocol.UndeploySubject("alpha", wid), protocol.StopWorkloadRequest{Namespace: "alpha"})
	ask := func(ns, ref string) []protocol.RecentStop {
		t.Helper()
		m := nats.NewMsg(protocol.WPingSubject(ns))
		m.Header.Set(protocol.HeaderStoppedRef, ref)
		m.Data = mustJSON(t, protocol.AgentListWorkloadsRequest{Namespace: ns, Filter: []string{}})
		r, err := conns[ns].RequestMsg(m, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var list []protocol.WorkloadSummary
		if err := json.Unmarshal(r.Data, &list); err != nil {
			t.Fatalf("body %q is not upstream's array: %v", r.Data, err)
		}
		var rs []protocol.RecentStop
		if h := r.Header.Get(protocol.HeaderStopped); h != "" {
			if err := json.Unmarshal([]byte(h), &rs); err != nil {
				t.Fatalf("%s %q: %v", protocol.HeaderStopped, h, err)
			}
		}
		return rs
	}
	for _, ref := range []string{"web", wid[:5], wid} {
		if rs := ask("alpha", ref); len(rs) != 1 || rs[0].ID != wid || rs[0].Name != "web" || rs[0].Namespace != "alpha" || rs[0].StoppedAt == "" {
			t.Errorf("alpha asking %q: %+v", ref, rs)
		}
		if rs := ask("beta", ref); len(rs) != 0 {
			t.Errorf("beta asking %q learns alpha's stop: %+v", ref, rs)
		}
		if rs := ask(protocol.SystemNamespace, ref); len(rs) != 1 || rs[0].Namespace != "alpha" {
			t.Errorf("system asking %q: %+v", ref, rs)
		}
	}
	if rs := ask("alpha", "other"); len(rs) != 0 {
		t.Errorf("a name that matches nothing: %+v", rs)
	}
}

// deployIn deploys a workload named name in namespace ns through an auction and
// returns its id.
func (f *fixture) deployIn(t *testing.T, ns, name string) string {
	t.Helper()
	bids := f.auction(ns, protocol.AuctionRequest{AgentType: "native"}, 1)
	m := request(t, f.client, protocol.DeploySubject(ns, bids[0].BidderID), startReq(ns, name, `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy %q: %v", m.Data, err)
	}
	return started.ID
}
