package node

import (
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackWorkloadRepliesOutsideItsNamespace: a workload of tenant-a, as the user
// its node minted, sends from one connection a request on its own namespace's subject
// with a reply subject of its choosing, and answers it from a second connection with a
// body of its choosing. Workloads had a response permission, which nats-server ranks
// above every deny, so the answer went out: into tenant-b's subjects and onto the
// node's LAMEDUCK (the node drained, for every tenant). Now a workload answers only on
// subjects it may publish to; requests from a sibling workload (its private inbox), the
// tenant (its inbox) and a default-inbox client are still answered.
func TestAttackWorkloadRepliesOutsideItsNamespace(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	cd, err := rf.m.MintWorkload("tenant-a", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var refused []string
	responder := testnats.Connect(t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.CustomInboxPrefix(cd.InboxPrefix), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			mu.Lock()
			refused = append(refused, err.Error())
			mu.Unlock()
		}))
	if _, err := responder.Subscribe("tenant-a.echo", func(m *nats.Msg) { _ = m.Respond(m.Data) }); err != nil || responder.Flush() != nil {
		t.Fatal(err)
	}
	requester := rf.dial(cd)
	watch, err := rf.client.SubscribeSync("tenant-b.orders")
	if err != nil || rf.client.Flush() != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ reply, body string }{
		{"tenant-b.orders", `{"order":"forged by tenant-a"}`},
		{protocol.LameduckSubject(n.ID()), `{"delay":"10m"}`},
	} {
		if err := requester.PublishMsg(&nats.Msg{Subject: "tenant-a.echo", Reply: c.reply, Data: []byte(c.body)}); err != nil {
			t.Fatal(err)
		}
		want := `Permissions Violation for Publish to "` + c.reply + `"`
		if !testkit.WaitFor(10*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return slices.ContainsFunc(refused, func(e string) bool { return strings.Contains(e, want) })
		}) {
			t.Errorf("the workload's answer on %s was not refused (errors %v)", c.reply, refused)
		}
	}
	if m, err := watch.NextMsg(500 * time.Millisecond); err == nil {
		t.Errorf("tenant-a's workload published into tenant-b.orders: %q", m.Data)
	}
	if ld, _ := n.Lameduck(); ld {
		t.Error("tenant-a's workload put the node in lameduck")
	}

	// Its legitimate requesters are answered: a sibling workload on its private inbox,
	// the tenant on its own, a client on the default inbox.
	sibling, err := rf.m.MintWorkload("tenant-a", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	for who, nc := range map[string]*nats.Conn{
		"a sibling workload (" + sibling.InboxPrefix + ")":            rf.dial(sibling),
		"the tenant (" + protocol.TenantInboxPrefix("tenant-a") + ")": rf.tenant("tenant-a").nc,
		"a client (_INBOX.)": rf.client,
	} {
		m, err := nc.Request("tenant-a.echo", []byte("ping"), 10*time.Second)
		if err != nil || string(m.Data) != "ping" {
			t.Errorf("%s asked the workload: %v", who, err)
		}
	}
}
