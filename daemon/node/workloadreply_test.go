package node

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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

// TestWorkloadJetStreamAnswersGoAnywhere shows what remains (README, Known
// limitations): a workload's user may call JetStream's API on its artifact bucket (the
// native nexlet fetches nats:// artifacts with it), and JetStream answers on the
// reply subject the caller chose, or delivers a push consumer's messages to the deliver
// subject it chose, with the account's rights. So a workload of tenant-a puts a stored
// object's bytes (its tenant writes the bucket) or JetStream's JSON into tenant-b's
// subjects. It fails once that no longer works: then update the README.
func TestWorkloadJetStreamAnswersGoAnywhere(t *testing.T) {
	rf := newRogueFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js, err := jetstream.New(rf.client)
	if err != nil {
		t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: "tenant-a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := obs.PutBytes(ctx, "bin", []byte(`{"order":"forged by tenant-a"}`)); err != nil {
		t.Fatal(err)
	}
	cd, err := rf.m.MintWorkload("tenant-a", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	w := rf.dial(cd)
	watch, err := rf.client.SubscribeSync("tenant-b.orders")
	if err != nil || rf.client.Flush() != nil {
		t.Fatal(err)
	}
	for _, m := range []*nats.Msg{
		{Subject: "$JS.API.DIRECT.GET.OBJ_tenant-a", Reply: "tenant-b.orders", Data: []byte(`{"seq":1}`)},
		{Subject: "$JS.API.STREAM.INFO.OBJ_tenant-a", Reply: "tenant-b.orders"},
		{Subject: "$JS.API.CONSUMER.CREATE.OBJ_tenant-a", Reply: w.NewInbox(), Data: []byte(`{"stream_name":"OBJ_tenant-a",` +
			`"config":{"deliver_subject":"tenant-b.orders","ack_policy":"none","deliver_policy":"all"}}`)},
	} {
		if err := w.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
		if got, err := watch.NextMsg(10 * time.Second); err != nil {
			t.Errorf("%s with tenant-b.orders as its answer's subject: nothing arrived there (%v); if that is fixed, update README's Known limitations", m.Subject, err)
		} else {
			t.Logf("%s: tenant-b.orders got %.60q", m.Subject, got.Data)
		}
	}
}
