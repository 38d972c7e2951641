package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// The attacks of a tenant: it holds the NATS user an operator gives a tenant with
// deploy rights in one namespace (mint.TenantPermissions, its own inbox prefix), on
// an operator-mode server that enforces it, against a node whose nexlets hold the
// users the node minted for them.

// tenantConn is a tenant's connection; errs holds what the server refused it.
type tenantConn struct {
	nc   *nats.Conn
	mu   sync.Mutex
	errs []string
}

func (rf *rogueFixture) tenant(ns string) *tenantConn {
	rf.t.Helper()
	p, err := mint.TenantPermissions(ns)
	if err != nil {
		rf.t.Fatal(err)
	}
	tok, seed := rf.op.UserWith(rf.t, "tenant-"+ns, nil, p)
	tc := &tenantConn{}
	tc.nc = testnats.Connect(rf.t, rf.op.Server, nats.UserJWTAndSeed(tok, seed),
		nats.CustomInboxPrefix(protocol.TenantInboxPrefix(ns)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			tc.mu.Lock()
			tc.errs = append(tc.errs, strings.ToLower(err.Error()))
			tc.mu.Unlock()
		}))
	return tc
}

// denied waits (3 s) for the server's permissions violation for op ("publish" or
// "subscription") on subject.
func (tc *tenantConn) denied(op, subject string) bool {
	want := strings.ToLower(fmt.Sprintf("permissions violation for %s to %q", op, subject))
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		tc.mu.Lock()
		ok := slices.ContainsFunc(tc.errs, func(e string) bool { return strings.Contains(e, want) })
		tc.mu.Unlock()
		if ok {
			return true
		}
	}
	return false
}

// list is a WPING in ns from nc: the workload ids and the Nex-Partial header.
func listOn(t *testing.T, nc *nats.Conn, ns string) (ids []string, partial string) {
	t.Helper()
	m := request(t, nc, protocol.WPingSubject(ns), protocol.AgentListWorkloadsRequest{Namespace: ns, Filter: []string{}})
	var ws []protocol.WorkloadSummary
	if err := json.Unmarshal(m.Data, &ws); err != nil {
		t.Fatalf("list in %s: body %q is not upstream's array: %v", ns, m.Data, err)
	}
	for _, w := range ws {
		ids = append(ids, w.ID)
	}
	return ids, m.Header.Get(protocol.HeaderPartial)
}

// deployAs auctions and deploys a workload named name in ns from nc.
func deployAs(t *testing.T, nc *nats.Conn, ns, name string) string {
	t.Helper()
	bids := collect(t, nc, protocol.AuctionSubject(ns), mustJSON(t, protocol.AuctionRequest{AgentType: "native",
		AuctionID: "auction-" + name, Tags: map[string]string{}}), 1, 10*time.Second, 300*time.Millisecond)
	if len(bids) != 1 {
		t.Fatalf("auction in %s: %d bids", ns, len(bids))
	}
	var b protocol.AuctionResponse
	if err := protocol.Decode(bids[0].Data, &b); err != nil {
		t.Fatal(err)
	}
	m := request(t, nc, protocol.DeploySubject(ns, b.BidderID), startReq(ns, name, `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		t.Fatalf("deploy in %s: %q %v", ns, m.Data, err)
	}
	return started.ID
}

// TestTenantUserAttacks: tenant A, as the user an operator gives it, runs and lists its
// own workloads, then tries to read tenant B's workloads, logs, events and replies
// (where nexlets get credentials), to stop or clone B's workload, to forge B's events
// and nexlets' reports, and to learn the node's nexlets (AGENTID, $SRV). The server
// refuses every subject outside A's namespace; through A's own subjects the node
// answers nothing of B's (403, not stopped, no clone). B's workload runs on.
func TestTenantUserAttacks(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	victim := rf.minted("AGENTVICTIM", "native", "native", nil)
	bWid := deployAs(t, rf.client, "tenant-b", "b-secret")
	a := rf.tenant("tenant-a")

	// The user does what a tenant needs.
	mine := deployAs(t, a.nc, "tenant-a", "mine")
	if ids, _ := listOn(t, a.nc, "tenant-a"); !slices.Equal(ids, []string{mine}) {
		t.Fatalf("tenant-a's list %v, want only its own %s", ids, mine)
	}
	sub, err := a.nc.SubscribeSync("$NEX.FEED.tenant-a.>")
	if err != nil || a.nc.Flush() != nil {
		t.Fatal(err)
	}
	if err := rf.client.Publish(protocol.LogSubject("tenant-a", mine, "stdout"), []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(5 * time.Second); err != nil {
		t.Fatalf("tenant-a reads its own logs: %v", err)
	}

	// Subscriptions: B's feeds, every feed, other clients' replies (nexlets' and
	// workloads' credentials, B's lists and deploy answers), the node's requests to
	// its nexlets (start requests carry workload credentials), B's subjects, JetStream.
	var subs []*nats.Subscription
	for _, subj := range []string{"$NEX.FEED.tenant-b.>", "$NEX.FEED.tenant-b.logs.>", "$NEX.FEED.>", "$NEX.FEED.*.events.>",
		"_INBOX.>", "_INBOX_*.>", "_INBOX_AGENTVICTIM.>", protocol.TenantInboxPrefix("tenant-b") + ".>", "$NEX.SVC.>",
		protocol.AgentPrefix(n.ID()) + ".>", "tenant-b.>", ">", "$JS.API.>", "$KV.>"} {
		s, err := a.nc.SubscribeSync(subj)
		if err != nil {
			t.Fatalf("subscribe %s: %v", subj, err)
		}
		subs = append(subs, s)
		if !a.denied("subscription", subj) {
			t.Errorf("tenant-a may subscribe to %s", subj)
		}
	}
	// What those would have caught: B's log line and a deploy in B (its replies on
	// the client's inbox, the start request with the workload's credentials).
	if err := rf.client.Publish(protocol.LogSubject("tenant-b", bWid, "stdout"), []byte("b's secret")); err != nil {
		t.Fatal(err)
	}
	deployAs(t, rf.client, "tenant-b", "b-second")
	for _, s := range subs {
		if m, err := s.NextMsg(200 * time.Millisecond); err == nil {
			t.Errorf("tenant-a's subscription %s caught %s %q", s.Subject, m.Subject, m.Data)
		}
	}

	// Requests and publications outside A's namespace.
	for _, c := range []struct {
		subject string
		body    any
	}{
		{protocol.WPingSubject("tenant-b"), protocol.AgentListWorkloadsRequest{Namespace: "tenant-b", Filter: []string{}}},
		{protocol.WPingSubject(protocol.SystemNamespace), protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}}},
		{protocol.UndeploySubject("tenant-b", bWid), protocol.StopWorkloadRequest{Namespace: "tenant-b"}},
		{protocol.UndeploySubject(protocol.SystemNamespace, bWid), protocol.StopWorkloadRequest{Namespace: protocol.SystemNamespace}},
		{protocol.CloneSubject("tenant-b", bWid), protocol.CloneWorkloadRequest{Namespace: "tenant-b"}},
		{protocol.AgentIDSubject(n.ID()), "native"},
		{protocol.InfoSubject(n.ID()), protocol.NodeInfoRequest{}},
		{protocol.LameduckSubject(n.ID()), protocol.LameduckRequest{Delay: "1s"}},
		{"$SRV.INFO", ""},
		{protocol.StopWorkloadAgentSubject(n.ID(), victim.id, bWid), protocol.StopWorkloadRequest{Namespace: "tenant-b"}},
		{protocol.WorkloadEndedSubject(n.ID(), victim.id, bWid), protocol.WorkloadStoppedEvent{ID: bWid, Namespace: "tenant-b"}},
		{protocol.EventSubject("tenant-b", protocol.EventWorkloadStopped), protocol.WorkloadStoppedEvent{ID: bWid, Namespace: "tenant-b"}},
		{protocol.EventSubject("tenant-a", protocol.EventWorkloadStopped), protocol.WorkloadStoppedEvent{ID: bWid, Namespace: "tenant-b"}},
		{protocol.LogSubject("tenant-b", bWid, "stdout"), "forged"},
		{"tenant-b.orders", "x"},
		{"$JS.API.STREAM.INFO.KV_nex-" + n.ID(), ""},
	} {
		m := &nats.Msg{Subject: c.subject, Reply: a.nc.NewInbox(), Data: mustJSON(t, c.body)}
		if err := a.nc.PublishMsg(m); err != nil {
			t.Fatalf("publish %s: %v", c.subject, err)
		}
		if !a.denied("publish", c.subject) {
			t.Errorf("tenant-a may publish to %s", c.subject)
		}
	}

	// Through A's own subjects: B's namespace in the body, or B's workload id.
	for _, c := range []struct {
		subject string
		body    any
	}{
		{protocol.WPingSubject("tenant-a"), protocol.AgentListWorkloadsRequest{Namespace: "tenant-b", Filter: []string{}}},
		{protocol.UndeploySubject("tenant-a", bWid), protocol.StopWorkloadRequest{Namespace: "tenant-b"}},
		{protocol.CloneSubject("tenant-a", bWid), protocol.CloneWorkloadRequest{Namespace: "tenant-b"}},
	} {
		if code, _ := errorReply(t, request(t, a.nc, c.subject, c.body)); code != "403" {
			t.Errorf("%s naming tenant-b: %s, want 403", c.subject, code)
		}
	}
	var stop protocol.StopWorkloadResponse
	if err := protocol.Decode(request(t, a.nc, protocol.UndeploySubject("tenant-a", bWid), protocol.StopWorkloadRequest{Namespace: "tenant-a"}).Data, &stop); err != nil || stop.Stopped {
		t.Errorf("tenant-a stopping tenant-b's %s in tenant-a: %+v %v", bWid, stop, err)
	}
	if m, err := a.nc.Request(protocol.CloneSubject("tenant-a", bWid), mustJSON(t, protocol.CloneWorkloadRequest{Namespace: "tenant-a"}), 3*time.Second); !errors.Is(err, nats.ErrTimeout) {
		t.Errorf("tenant-a cloning tenant-b's %s in tenant-a: %v %v, want no answer", bWid, m, err)
	}
	if ids, _ := listOn(t, a.nc, "tenant-a"); !slices.Equal(ids, []string{mine}) {
		t.Errorf("tenant-a's list %v, want only %s", ids, mine)
	}

	if ids, _ := listOn(t, rf.client, "tenant-b"); !slices.Contains(ids, bWid) {
		t.Errorf("tenant-b's %s is gone: %v", bWid, ids)
	}
	if !n.owns(bWid) {
		t.Errorf("the node no longer owns tenant-b's %s", bWid)
	}
}
