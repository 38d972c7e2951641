package mint

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"
	"github.com/nexd-project/nexd/protocol"
)

func nodeID(t *testing.T) string {
	_, pub := mustKP(t, nkeys.CreateServer)
	return pub
}

func newSigning(t *testing.T, e *opEnv, o Options) *SigningKeyMinter {
	t.Helper()
	o.Servers = []string{e.s.ClientURL()}
	m, err := NewSigningKeyMinter(e.sigSeed, e.accPub, o)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestWorkloadScope(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	m := newSigning(t, e, Options{})
	wid := nuid.Next()
	cd, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	if cd.ConnName != "workload:ns1:"+wid || cd.NatsServers[0] != e.s.ClientURL() {
		t.Fatalf("connection data: %+v", cd)
	}
	w := mustDial(t, e.s.ClientURL(), cd)

	t.Run("own namespace", func(t *testing.T) {
		canPublish(t, admin, w, "ns1.orders.new")
		canSubscribe(t, admin, w, "ns1.>", "ns1.orders.paid")
		canRespond(t, admin, w, "ns1.svc.echo")
		canSubscribe(t, admin, w, "$NEX.FEED.ns1.logs.>", "$NEX.FEED.ns1.logs.other.stdout")
	})
	t.Run("denied", func(t *testing.T) {
		cannotSubscribe(t, w, "$NEX.SVC.>")
		cannotSubscribe(t, w, "$NEX.SVC.system.control.PING")
		cannotSubscribe(t, w, "$NEX.FEED.ns2.logs.>")
		cannotSubscribe(t, w, "ns2.>")
		cannotSubscribe(t, w, ">")
		cannotPublish(t, w, "ns2.orders")
		cannotPublish(t, w, protocol.PingSubject())
		cannotPublish(t, w, protocol.AuctionSubject("ns1"))
		cannotPublish(t, w, protocol.LogSubject("ns1", wid, "stdout"))
		cannotPublish(t, w, "$JS.API.STREAM.CREATE.X")
	})
}

func TestWorkloadCredsExpire(t *testing.T) {
	e := startOperator(t)
	// 3s rather than 2s: the JWT expiry has whole-second resolution, and the connection
	// must still be made on a loaded machine before it runs out.
	m := newSigning(t, e, Options{WorkloadTTL: 3 * time.Second})
	cd, err := m.MintWorkload("ns1", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	if uc.Expires == 0 || uc.Expires > time.Now().Add(4*time.Second).Unix() {
		t.Fatalf("expiry %d not within the 3s TTL", uc.Expires)
	}
	w := mustDial(t, e.s.ClientURL(), cd)
	select {
	case <-w.closed:
	case <-time.After(30 * time.Second):
		t.Fatal("server kept the connection open after the credentials expired")
	}
	// Once expired, the credentials are refused (the server may accept the CONNECT in
	// the very second of expiry, then closes at once).
	if again, err := dial(t, e.s.ClientURL(), cd); err == nil {
		select {
		case <-again.closed:
		case <-time.After(waitLong):
			t.Fatal("expired credentials connected and stayed connected")
		}
	}
}

func TestAgentScope(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	node, other := nodeID(t), nodeID(t)
	m := newSigning(t, e, Options{Nexus: "nexus1"})
	agent := nuid.Next()
	cd, err := m.MintAgent(agent, node, true)
	if err != nil {
		t.Fatal(err)
	}
	if cd.ConnName != "nexlet:"+agent {
		t.Fatalf("conn name %q", cd.ConnName)
	}
	a := mustDial(t, e.s.ClientURL(), cd)

	t.Run("its job", func(t *testing.T) {
		canPublish(t, admin, a, protocol.AgentHeartbeatSubject(node, agent))
		canPublish(t, admin, a, protocol.RenewCredsSubject(node, agent, "w1"))
		canPublish(t, admin, a, protocol.LogSubject("ns1", "w1", "stdout"))
		canPublish(t, admin, a, protocol.LogSubject("ns2", "w2", "stderr"))
		canPublish(t, admin, a, protocol.MetricsSubject("ns1", "w1"))
		canPublish(t, admin, a, protocol.EventSubject("ns1", "WORKLOADSTARTED"))
		canPublish(t, admin, a, protocol.EventSubject(agent, "INGRESS"))
		canRespond(t, admin, a, protocol.StartWorkloadSubject(node, agent, "w1"))
		canRespond(t, admin, a, protocol.StopWorkloadSubject(node, "w1"))
		canRespond(t, admin, a, protocol.GetWorkloadSubject(node, "w1"))
		canRespond(t, admin, a, protocol.QueryWorkloadsSubject(node))
		canRespond(t, admin, a, protocol.PingAgentSubject(node, agent))
		canRespond(t, admin, a, protocol.PingAllAgentsSubject(node))
		canRespond(t, admin, a, protocol.SetLameduckAgentsSubject(node))
		canRespond(t, admin, a, protocol.PingWorkloadSubject("nexus1", "w1"))
		canSubscribe(t, admin, a, protocol.AgentEventsSubject(agent), protocol.AgentEventsSubject(agent))
	})
	t.Run("nothing else", func(t *testing.T) {
		cannotSubscribe(t, a, "$NEX.SVC.system.control.>")
		cannotSubscribe(t, a, protocol.StartWorkloadSubject(node, "otheragent", "*"))
		cannotSubscribe(t, a, protocol.AgentPrefix(other)+".>")
		cannotSubscribe(t, a, "$NEX.FEED.ns1.logs.>")
		cannotSubscribe(t, a, "ns1.>")
		cannotSubscribe(t, a, "$SRV.>")
		cannotSubscribe(t, a, "$SRV.PING")
		cannotSubscribe(t, a, "$SRV.INFO.nexnode")
		cannotPublish(t, a, protocol.RegisterSubject(other, agent))
		cannotPublish(t, a, protocol.RegisterSubject(node, "otheragent"))
		cannotPublish(t, a, protocol.AgentHeartbeatSubject(node, "otheragent"))
		cannotPublish(t, a, protocol.RenewCredsSubject(node, "otheragent", "w1"))
		cannotPublish(t, a, protocol.RenewCredsSubject(other, agent, "w1"))
		cannotPublish(t, a, protocol.PingSubject())
		cannotPublish(t, a, protocol.DeploySubject("ns1", "bidder"))
		cannotPublish(t, a, "ns1.orders")
		cannotPublish(t, a, "$JS.API.STREAM.INFO.OBJ_ns1")
	})
	// Without direct (the default: allow_nexlet_direct_feeds off, or a nexlet that
	// relays), its feeds go only through its node's relay, under its own agent id.
	t.Run("relayed feeds only", func(t *testing.T) {
		cd, err := m.MintAgent(agent, node, false)
		if err != nil {
			t.Fatal(err)
		}
		r := mustDial(t, e.s.ClientURL(), cd)
		canPublish(t, admin, r, protocol.FeedRelaySubject(node, agent, protocol.LogSubject("ns1", "w1", "stdout")))
		canPublish(t, admin, r, protocol.AgentHeartbeatSubject(node, agent))
		cannotPublish(t, r, protocol.FeedRelaySubject(node, "otheragent", protocol.LogSubject("ns1", "w1", "stdout")))
		cannotPublish(t, r, protocol.LogSubject("ns1", "w1", "stdout"))
		cannotPublish(t, r, protocol.MetricsSubject("ns1", "w1"))
		cannotPublish(t, r, protocol.EventSubject("ns1", "WORKLOADSTOPPED"))
	})
}

func TestRegisterScope(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	node, other := nodeID(t), nodeID(t)
	m := newSigning(t, e, Options{})
	agent := nuid.Next()
	cd, err := m.MintRegister(agent, node)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(time.Unix(uc.Expires, 0)); d > DefaultRegisterTTL+time.Second {
		t.Fatalf("registration creds live %s", d)
	}
	r := mustDial(t, e.s.ClientURL(), cd)

	// The registration is a request: the node (admin here) answers on the inbox.
	sub, err := admin.Subscribe(protocol.RegisterSubject(node, agent), func(m *nats.Msg) { _ = m.Respond([]byte(`{"success":true}`)) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := admin.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.nc.Request(protocol.RegisterSubject(node, agent), []byte("{}"), waitLong); err != nil {
		t.Fatalf("register request: %v", err)
	}

	cannotPublish(t, r, protocol.RegisterSubject(other, agent))
	cannotPublish(t, r, protocol.RegisterSubject(node, "otheragent"))
	cannotPublish(t, r, protocol.AgentHeartbeatSubject(node, agent))
	cannotPublish(t, r, protocol.LogSubject("ns1", "w", "stdout"))
	cannotSubscribe(t, r, protocol.StartWorkloadSubject(node, agent, "*"))
	cannotSubscribe(t, r, "$NEX.SVC.system.control.>")
}

func TestWorkloadArtifactFetch(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ajs, err := jetstream.New(admin)
	if err != nil {
		t.Fatal(err)
	}
	var fetchWithin func(t *testing.T, ctx context.Context, cd protocol.NatsConnectionData, bucket string) error
	artifact := bytes.Repeat([]byte("binary!"), 300_000) // several chunks
	for _, b := range []string{"ns1", "shared", "secret"} {
		obs, err := ajs.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: b})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := obs.PutBytes(ctx, "echo", artifact); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ajs.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "nex-node"}); err != nil {
		t.Fatal(err)
	}

	// A refused JetStream API request gets no reply, so a denied fetch ends at its own
	// short deadline; an allowed one must finish within the test's.
	fetch := func(t *testing.T, cd protocol.NatsConnectionData, bucket string) error {
		t.Helper()
		return fetchWithin(t, ctx, cd, bucket)
	}
	denied := func(t *testing.T, cd protocol.NatsConnectionData, bucket string) error {
		t.Helper()
		dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
		defer dcancel()
		return fetchWithin(t, dctx, cd, bucket)
	}
	fetchWithin = func(t *testing.T, ctx context.Context, cd protocol.NatsConnectionData, bucket string) error {
		t.Helper()
		w := mustDial(t, e.s.ClientURL(), cd)
		js, err := jetstream.New(w.nc)
		if err != nil {
			return err
		}
		obs, err := js.ObjectStore(ctx, bucket)
		if err != nil {
			return err
		}
		got, err := obs.GetBytes(ctx, "echo")
		if err != nil {
			return err
		}
		if !bytes.Equal(got, artifact) {
			t.Fatalf("fetched %d bytes, want %d", len(got), len(artifact))
		}
		return nil
	}

	t.Run("default namespace bucket", func(t *testing.T) {
		m := newSigning(t, e, Options{})
		wid := nuid.Next()
		cd, err := m.MintArtifactReader("ns1", wid)
		if err != nil {
			t.Fatal(err)
		}
		if err := fetch(t, cd, "ns1"); err != nil {
			t.Fatalf("nats://ns1/echo with the artifact reader: %v", err)
		}
		if err := denied(t, cd, "secret"); err == nil {
			t.Fatal("read a bucket not listed for the namespace")
		}
		// The workload's own user has no JetStream at all (JetStream answers where
		// its caller says: TestAttackWorkloadJetStreamAnswersGoAnywhere).
		wcd, err := m.MintWorkload("ns1", wid)
		if err != nil {
			t.Fatal(err)
		}
		if err := denied(t, wcd, "ns1"); err == nil {
			t.Fatal("the workload's own user read its namespace's bucket")
		}
	})
	t.Run("configured buckets", func(t *testing.T) {
		m := newSigning(t, e, Options{ArtifactBuckets: func(ns string) []string { return []string{"shared"} }})
		cd, err := m.MintArtifactReader("ns2", nuid.Next())
		if err != nil {
			t.Fatal(err)
		}
		if err := fetch(t, cd, "shared"); err != nil {
			t.Fatalf("nats://shared/echo: %v", err)
		}
		if err := denied(t, cd, "ns1"); err == nil {
			t.Fatal("read another namespace's bucket")
		}
	})
	t.Run("read only, no state", func(t *testing.T) {
		cd, err := newSigning(t, e, Options{}).MintArtifactReader("ns1", nuid.Next())
		if err != nil {
			t.Fatal(err)
		}
		w := mustDial(t, e.s.ClientURL(), cd)
		js, _ := jetstream.New(w.nc)
		obs, err := js.ObjectStore(ctx, "ns1")
		if err != nil {
			t.Fatal(err)
		}
		pctx, pcancel := context.WithTimeout(ctx, 3*time.Second)
		defer pcancel()
		if _, err := obs.PutBytes(pctx, "evil", []byte("x")); err == nil {
			t.Fatal("workload wrote to the object store")
		}
		if _, err := js.KeyValue(pctx, "nex-node"); err == nil {
			t.Fatal("workload opened the node state bucket")
		}
	})
}

func TestRevokeWorkload(t *testing.T) {
	e := startOperator(t)
	rev := &AccountRevoker{
		OperatorSigner: e.opKP,
		Retain:         time.Hour,
		Load: func(context.Context) (string, error) {
			return e.resolver.Fetch(e.accPub)
		},
		Push: func(_ context.Context, token string) error {
			ac, err := jwt.DecodeAccountClaims(token)
			if err != nil {
				return err
			}
			if err := e.resolver.Store(ac.Subject, token); err != nil {
				return err
			}
			acc, err := e.s.LookupAccount(ac.Subject)
			if err != nil {
				return err
			}
			e.s.UpdateAccountClaims(acc, ac)
			return nil
		},
	}
	m := newSigning(t, e, Options{Revoker: rev})
	wid := nuid.Next()
	cd1, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	cd2, err := m.RenewWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	if cd1.NatsUserJWT == cd2.NatsUserJWT || len(m.WorkloadUsers(wid)) != 2 {
		t.Fatalf("renewal did not mint a new user: %v", m.WorkloadUsers(wid))
	}
	if _, err := m.RenewWorkload("ns2", wid); err == nil {
		t.Fatal("renewed into another namespace")
	}
	keep, err := m.MintWorkload("ns1", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	w1 := mustDial(t, e.s.ClientURL(), cd1)
	w2 := mustDial(t, e.s.ClientURL(), cd2)
	k := mustDial(t, e.s.ClientURL(), keep)

	if err := m.RevokeWorkload(context.Background(), wid); err != nil {
		t.Fatal(err)
	}
	for _, w := range []*client{w1, w2} {
		select {
		case <-w.closed:
		case <-time.After(waitLong):
			t.Fatal("revoked workload connection still open")
		}
	}
	if _, err := dial(t, e.s.ClientURL(), cd2); err == nil {
		t.Fatal("revoked credentials connected")
	}
	if err := k.nc.Flush(); err != nil {
		t.Fatalf("other workload lost its connection: %v", err)
	}
	if err := m.RevokeWorkload(context.Background(), wid); !errors.Is(err, ErrUnknownWorkload) {
		t.Fatalf("second revoke: %v", err)
	}
	tok, _ := e.resolver.Fetch(e.accPub)
	ac, _ := jwt.DecodeAccountClaims(tok)
	if len(ac.Revocations) != 2 {
		t.Fatalf("account revocations: %v", ac.Revocations)
	}
}

func TestRevokeUnsupported(t *testing.T) {
	e := startOperator(t)
	m := newSigning(t, e, Options{})
	wid := nuid.Next()
	if _, err := m.MintWorkload("ns1", wid); err != nil {
		t.Fatal(err)
	}
	if err := m.RevokeWorkload(context.Background(), wid); !errors.Is(err, ErrRevocationUnsupported) {
		t.Fatalf("revoke without revoker: %v", err)
	}
	if len(m.WorkloadUsers(wid)) != 0 {
		t.Fatal("stopped workload still tracked")
	}
	if m.Warning() == "" {
		t.Fatal("no warning about missing revocation")
	}
}

func TestWorkloadInboxPrefix(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ajs, _ := jetstream.New(admin)
	obs, err := ajs.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: "ns1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := obs.PutBytes(ctx, "echo", []byte("artifact")); err != nil {
		t.Fatal(err)
	}

	prefix := func(ns, id string) string { return "_INBOX_" + ns + "." + id }
	m := newSigning(t, e, Options{WorkloadInboxPrefix: prefix})
	wid := nuid.Next()
	cd, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	w := &client{errs: make(chan error, 64), closed: make(chan struct{})}
	w.nc, err = nats.Connect(e.s.ClientURL(), append(connectOpts(t, cd),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { w.errs <- err }))...)
	if err != nil {
		t.Fatal(err)
	}
	defer w.nc.Close()

	// Requests get their replies on the workload's own inbox.
	sub, err := admin.Subscribe("ns1.svc", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	admin.Flush()
	if _, err := w.nc.Request("ns1.svc", nil, waitLong); err != nil {
		t.Fatalf("request with the workload inbox: %v", err)
	}
	cannotSubscribe(t, w, "_INBOX.>")
	cannotSubscribe(t, w, "_INBOX_ns1.>")

	bad := newSigning(t, e, Options{WorkloadInboxPrefix: func(string, string) string { return "_INBOX.>" }})
	if _, err := bad.MintWorkload("ns1", wid); err == nil {
		t.Fatal("accepted a wildcard inbox prefix")
	}
}

// Revocation through the system account against a full (directory) resolver, as a
// production operator setup would do it.
func TestSystemAccountRevoker(t *testing.T) {
	e, res, rev := startRevokingOperator(t)
	m := newSigning(t, e, Options{Revoker: rev})
	wid := nuid.Next()
	cd, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	w := mustDial(t, e.s.ClientURL(), cd)
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	if err := m.RevokeWorkload(ctx, wid); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.closed:
	case <-time.After(waitLong):
		t.Fatal("revoked workload connection still open")
	}
	if again, err := dial(t, e.s.ClientURL(), cd); err == nil {
		select {
		case <-again.closed:
		case <-time.After(waitLong):
			t.Fatal("revoked credentials connected")
		}
	}
	tok, err := res.Fetch(e.accPub)
	if err != nil {
		t.Fatal(err)
	}
	ac, _ := jwt.DecodeAccountClaims(tok)
	if len(ac.Revocations) != 1 {
		t.Fatalf("stored account revocations: %v", ac.Revocations)
	}

	// A revoker for an account the resolver does not know fails clearly.
	_, unknown := mustKP(t, nkeys.CreateAccount)
	bad := NewSystemAccountRevoker(e.userOf(t, e.sysKP), e.opKP, unknown, 0)
	_, upub := mustKP(t, nkeys.CreateUser)
	if err := bad.RevokeUser(ctx, upub, time.Now()); err == nil {
		t.Fatal("revoked in an unknown account")
	}
}

// A nexlet answers a slow start with progress reports before its answer, all on the
// one reply subject: every message must get through (with MaxMsgs 1 the answer was a
// publish violation and the deploy timed out).
func TestAgentProgressRepliesGetThrough(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	node := nodeID(t)
	m := newSigning(t, e, Options{})
	agent := nuid.Next()
	cd, err := m.MintAgent(agent, node, true)
	if err != nil {
		t.Fatal(err)
	}
	a := mustDial(t, e.s.ClientURL(), cd).nc
	subj := protocol.StartWorkloadSubject(node, agent, "w1")
	if _, err := a.Subscribe(subj, func(msg *nats.Msg) {
		for i := range 3 {
			_ = a.Publish(msg.Reply, []byte{byte('0' + i)})
		}
		_ = msg.Respond([]byte("done"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}
	inbox := nats.NewInbox()
	sub, err := admin.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.PublishRequest(subj, inbox, nil); err != nil {
		t.Fatal(err)
	}
	var got []string
	for range 4 {
		msg, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		got = append(got, string(msg.Data))
	}
	if got[3] != "done" {
		t.Errorf("replies %q, want three progress reports then done", got)
	}
}

// TestSupersededUsersRevoked: after a renewal a workload's old user is revoked; after a
// nexlet registered again its registration users and its previous start's user are,
// and a user minted after the registration's (a dropped registration's) is not.
func TestSupersededUsersRevoked(t *testing.T) {
	e, _, rev := startRevokingOperator(t)
	m := newSigning(t, e, Options{Revoker: rev})
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	refused := func(what string, cd protocol.NatsConnectionData) {
		t.Helper()
		if c, err := dial(t, e.s.ClientURL(), cd); err == nil {
			select {
			case <-c.closed:
			case <-time.After(waitLong):
				t.Fatalf("%s: revoked credentials connected", what)
			}
		}
	}

	wid := nuid.Next()
	first, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	renewed, err := m.RenewWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.RevokeSuperseded(ctx, wid); err != nil {
		t.Fatal(err)
	}
	refused("the renewed workload's first user", first)
	mustDial(t, e.s.ClientURL(), renewed).nc.Close()

	aid, node := nuid.Next(), "N"+strings.Repeat("A", 55)
	reg1, _ := m.MintRegister(aid, node)
	agent1, _ := m.MintAgent(aid, node, false)
	reg2, _ := m.MintRegister(aid, node)
	agent2, err := m.MintAgent(aid, node, false)
	if err != nil {
		t.Fatal(err)
	}
	// A registration dropped after it minted (the nexlet gave it up) leaves a later user.
	dropped, _ := m.MintAgent(aid, node, false)
	agent2KP, _ := nkeys.FromSeed([]byte(agent2.NatsUserSeed))
	agent2Pub, _ := agent2KP.PublicKey()
	if err := m.RevokeAgentBefore(ctx, aid, agent2Pub); err != nil {
		t.Fatal(err)
	}
	refused("the first registration user", reg1)
	refused("the previous start's nexlet user", agent1)
	refused("the second registration user", reg2)
	mustDial(t, e.s.ClientURL(), agent2).nc.Close()
	mustDial(t, e.s.ClientURL(), dropped).nc.Close()

	// The nexlet renews its own user for a key it made: the reply is a JWT for that
	// key and no seed; a key used before is refused; once it switched, its older user
	// is revoked and the new one (with the nexlet's seed) connects.
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	own, err := m.RenewAgent(aid, node, pub, true)
	if err != nil {
		t.Fatal(err)
	}
	if own.NatsUserSeed != "" {
		t.Fatal("a renewed nexlet user came with a seed")
	}
	if _, err := m.RenewAgent(aid, node, pub, true); err == nil {
		t.Fatal("a key used before was renewed again")
	}
	if err := m.RevokeAgentBefore(ctx, aid, pub); err != nil {
		t.Fatal(err)
	}
	refused("the nexlet user before the renewal", agent2)
	seed, _ := kp.Seed()
	own.NatsUserSeed = string(seed)
	mustDial(t, e.s.ClientURL(), own).nc.Close()
}

// TestAgentIDOfTheNodesInboxes: no nexlet user may subscribe to the node's inboxes
// (protocol.NodeInboxRoot): agent id "nexd", which a remote nexlet may choose, is
// refused; its user had read every answer to the node.
func TestAgentIDOfTheNodesInboxes(t *testing.T) {
	e := startOperator(t)
	m := newSigning(t, e, Options{})
	node := nodeID(t)
	for name, mint := range map[string]func() error{
		"register": func() error { _, err := m.MintRegister("nexd", node); return err },
		"nexlet":   func() error { _, err := m.MintAgent("nexd", node, false); return err },
	} {
		if err := mint(); err == nil || !strings.Contains(err.Error(), protocol.NodeInboxRoot) {
			t.Errorf("%s user for agent id nexd: error %v, want one naming %s", name, err, protocol.NodeInboxRoot)
		}
	}
	if _, err := m.MintAgent("nexd-1", node, false); err != nil {
		t.Errorf("agent id nexd-1: %v", err)
	}
}

// BenchmarkMintWorkload is a deploy's mint of its workload's user with a signing key:
// a new user nkey and its signed JWT.
func BenchmarkMintWorkload(b *testing.B) {
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	sk, _ := nkeys.CreateAccount()
	seed, _ := sk.Seed()
	m, err := NewSigningKeyMinter(string(seed), accPub, Options{})
	if err != nil {
		b.Fatal(err)
	}
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		i++
		if _, _, err := m.mintWorkload("system", "w"+strconv.Itoa(i)); err != nil {
			b.Fatal(err)
		}
	}
}

// TestMintedUserKeyIsItsSeeds: a minted workload user's JWT names the public key of the
// seed it comes with, a user key, and the seed signs what the key verifies.
func TestMintedUserKeyIsItsSeeds(t *testing.T) {
	m := newKeyMinter(t, nil)
	for i := range 20 {
		cd, err := m.MintWorkload("tenant", "w"+strconv.Itoa(i))
		if err != nil {
			t.Fatal(err)
		}
		kp, err := nkeys.FromSeed([]byte(cd.NatsUserSeed))
		if err != nil {
			t.Fatal(err)
		}
		pub, err := kp.PublicKey()
		if err != nil {
			t.Fatal(err)
		}
		uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
		if err != nil {
			t.Fatal(err)
		}
		if uc.Subject != pub || !nkeys.IsValidPublicUserKey(pub) {
			t.Fatalf("JWT subject %s, seed's key %s: want the same user key", uc.Subject, pub)
		}
		sig, err := kp.Sign([]byte("nonce"))
		if err != nil {
			t.Fatal(err)
		}
		vk, err := nkeys.FromPublicKey(uc.Subject)
		if err != nil {
			t.Fatal(err)
		}
		if err := vk.Verify([]byte("nonce"), sig); err != nil {
			t.Fatalf("the seed's signature does not verify under the JWT's key: %v", err)
		}
	}
}
