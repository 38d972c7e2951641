package node

import (
	"context"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
	responder, refused := rf.dialRefusals(cd)
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
		if !refused(`Permissions Violation for Publish to "` + c.reply + `"`) {
			t.Errorf("the workload's answer on %s was not refused", c.reply)
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

// TestAttackWorkloadJetStreamAnswersGoAnywhere: JetStream answers on the reply subject
// its caller sets, and delivers a push consumer to the deliver subject its creator sets,
// with the account's rights. A workload's user had read grants on its artifact bucket
// (the native nexlet fetched with it), so a workload of tenant-a put a stored object's
// bytes (its tenant writes the bucket) or JetStream's JSON on tenant-b.orders, or on
// the node's LAMEDUCK. Now its user has no JetStream grant: its nexlet fetches with an
// artifact reader of its own (MintArtifactReader), which reads the bucket. The
// workload still subscribes to no inbox but its own.
func TestAttackWorkloadJetStreamAnswersGoAnywhere(t *testing.T) {
	rf := newRogueFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rf.putObject(ctx, "tenant-a", "bin", []byte(`{"order":"forged by tenant-a"}`))
	wid := nuid.Next()
	cd, err := rf.m.MintWorkload("tenant-a", wid)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var refused []string
	w := testnats.Connect(t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.CustomInboxPrefix(cd.InboxPrefix), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			mu.Lock()
			refused = append(refused, err.Error())
			mu.Unlock()
		}))
	isRefused := func(op, subject string) bool {
		want := `Permissions Violation for ` + op + ` to "` + subject + `"`
		return testkit.WaitFor(10*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return slices.ContainsFunc(refused, func(e string) bool { return strings.Contains(e, want) })
		})
	}
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
		if !isRefused("Publish", m.Subject) {
			t.Errorf("the workload's %s was not refused (errors %v)", m.Subject, refused)
		}
	}
	if got, err := watch.NextMsg(500 * time.Millisecond); err == nil {
		t.Errorf("tenant-a's workload had JetStream publish into tenant-b.orders: %.60q", got.Data)
	}

	// Its inbox is its own: not every client's, not a sibling's, not its artifact reader's.
	sibling := nuid.Next()
	for _, subj := range []string{"_INBOX.>", "_INBOX.*.>", protocol.WorkloadInboxPrefix(sibling) + ".>",
		protocol.ArtifactInboxPrefix(wid) + ".>", protocol.TenantInboxPrefix("tenant-a") + ".>"} {
		if _, err := w.SubscribeSync(subj); err != nil {
			t.Fatal(err)
		}
		if !isRefused("Subscription", subj) {
			t.Errorf("the workload may subscribe to %s", subj)
		}
	}

	// The artifact reader its nexlet fetches with reads the object.
	ar, err := rf.m.MintArtifactReader("tenant-a", wid)
	if err != nil {
		t.Fatal(err)
	}
	ajs, err := jetstream.New(rf.dial(ar))
	if err != nil {
		t.Fatal(err)
	}
	aobs, err := ajs.ObjectStore(ctx, "tenant-a")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := aobs.GetBytes(ctx, "bin"); err != nil || !strings.Contains(string(got), "forged") {
		t.Fatalf("the artifact reader's fetch: %q %v", got, err)
	}
}

// TestWorkloadOfAnOlderNexdKeepsItsInbox: a workload started by a nexd from before
// workloads' inboxes moved to _INBOX.<id> connects with _INBOX_<id>, from the
// environment it was started with, for as long as it runs. Upgrades keep it running
// (README, Restarts and upgrades), and the new nexd's replay and renewals hand it users
// minted now: with _INBOX.<id>.> alone, its next connection's replies were refused (a
// request to a client of its namespace timed out). Its own old prefix is granted too,
// and stays its own: a sibling workload may subscribe there no more than before.
func TestWorkloadOfAnOlderNexdKeepsItsInbox(t *testing.T) {
	rf := newRogueFixture(t)
	wid := nuid.Next()
	cd, err := rf.m.RenewWorkload("tenant-a", wid)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rf.client.Subscribe("tenant-a.svc", func(m *nats.Msg) { _ = m.Respond([]byte("pong")) }); err != nil || rf.client.Flush() != nil {
		t.Fatal(err)
	}
	old := testnats.Connect(t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.CustomInboxPrefix(protocol.InboxPrefix(wid)))
	if m, err := old.Request("tenant-a.svc", []byte("ping"), 10*time.Second); err != nil || string(m.Data) != "pong" {
		t.Errorf("a workload of an older nexd (inbox %s), renewed by this one, asked a client of its namespace: %v", protocol.InboxPrefix(wid), err)
	}

	sibling, err := rf.m.MintWorkload("tenant-a", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	sn, refused := rf.dialRefusals(sibling)
	if _, err := sn.SubscribeSync(protocol.InboxPrefix(wid) + ".>"); err != nil {
		t.Fatal(err)
	}
	if !refused(`Permissions Violation for Subscription to "` + protocol.InboxPrefix(wid) + `.>"`) {
		t.Errorf("a sibling workload subscribed to %s.> (another workload's inbox)", protocol.InboxPrefix(wid))
	}
}

// TestAttackWorkloadSubscribesToOthersInboxes: workloads may publish to _INBOX.> (to
// answer) and their private inboxes moved under it, _INBOX.<id>; subscribing is as
// before: a workload, as the user its node minted, is refused every inbox but its own
// (every client's, any workload's by wildcard or by id, its tenant's, a nexlet's), and
// while it tries, the requests of a sibling, the tenant and a default-inbox client are
// answered with nothing reaching it.
func TestAttackWorkloadSubscribesToOthersInboxes(t *testing.T) {
	rf := newRogueFixture(t)
	cd, err := rf.m.MintWorkload("tenant-a", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	sib := nuid.Next()
	sibling, err := rf.m.MintWorkload("tenant-a", sib)
	if err != nil {
		t.Fatal(err)
	}
	w, refused := rf.dialRefusals(cd)
	var captured atomic.Int64
	sniffs := []string{">", "_INBOX.>", "_INBOX.*.>", "_INBOX.*.*.*", "_INBOX." + sib + ".>", protocol.InboxPrefix(sib) + ".>",
		protocol.TenantInboxPrefix("tenant-a") + ".>", "_INBOX_*.>", protocol.InboxPrefix(nuid.Next()) + ".>"}
	for _, s := range sniffs {
		if _, err := w.Subscribe(s, func(*nats.Msg) { captured.Add(1) }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := rf.client.Subscribe("tenant-a.svc", func(m *nats.Msg) { _ = m.Respond([]byte("pong")) }); err != nil || rf.client.Flush() != nil {
		t.Fatal(err)
	}
	for who, nc := range map[string]*nats.Conn{
		"a sibling workload": rf.dial(sibling),
		"the tenant":         rf.tenant("tenant-a").nc,
		"a client (_INBOX.)": rf.client,
	} {
		if m, err := nc.Request("tenant-a.svc", []byte("ping"), 10*time.Second); err != nil || string(m.Data) != "pong" {
			t.Errorf("%s asked: %v", who, err)
		}
	}
	for _, s := range sniffs {
		if !refused(`Permissions Violation for Subscription to "` + s + `"`) {
			t.Errorf("the workload's subscription to %s was not refused", s)
		}
	}
	if n := captured.Load(); n > 0 {
		t.Errorf("the workload read %d messages on inboxes not its own", n)
	}
}

// dialRefusals is dial with the server's asynchronous errors kept: refused(want) waits
// (10 s at most) for one whose text holds want.
func (rf *rogueFixture) dialRefusals(cd protocol.NatsConnectionData) (nc *nats.Conn, refused func(want string) bool) {
	var mu sync.Mutex
	var errs []string
	nc = testnats.Connect(rf.t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.CustomInboxPrefix(cd.InboxPrefix), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			mu.Lock()
			errs = append(errs, err.Error())
			mu.Unlock()
		}))
	return nc, func(want string) bool {
		return testkit.WaitFor(10*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return slices.ContainsFunc(errs, func(e string) bool { return strings.Contains(e, want) })
		})
	}
}
