package node

import (
	"context"
	"encoding/base64"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// deployOne deploys a native workload in ns through an auction and returns its id.
func (f *fixture) deployOne(ns string) string {
	f.t.Helper()
	bids := f.auction(ns, protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		f.t.Fatal("no bid")
	}
	m := request(f.t, f.client, protocol.DeploySubject(ns, bids[0].BidderID), startReq(ns, "w", `{"cmd":"x"}`))
	var started protocol.StartWorkloadResponse
	if err := protocol.Decode(m.Data, &started); err != nil || started.ID == "" {
		f.t.Fatalf("deploy reply %q %v", m.Data, err)
	}
	return started.ID
}

func (f *fixture) renew(n *Node, agentID, workloadID string, body any) (protocol.NatsConnectionData, string) {
	f.t.Helper()
	m := request(f.t, f.client, protocol.RenewCredsSubject(n.ID(), agentID, workloadID), body)
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
		return protocol.NatsConnectionData{}, code
	}
	var cd protocol.NatsConnectionData
	if err := protocol.Decode(m.Data, &cd); err != nil {
		f.t.Fatalf("renewal reply %q: %v", m.Data, err)
	}
	return cd, ""
}

func TestRenewCredsOnlyForOwnedWorkloads(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	ctx := context.Background()
	if err := f.stores[0].Put(ctx, "native", "replayed1", startReq("tenant", "r", `{"cmd":"x"}`)); err != nil {
		t.Fatal(err)
	}
	a := f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	f.healthyAgent(n, "agent1", "js", "javascript", nil)
	wid := f.deployOne("tenant")
	ns := protocol.RenewCredsRequest{Namespace: "tenant"}

	for _, tc := range []struct {
		name, agent, workload string
		body                  any
		code                  string // "" = creds
	}{
		{name: "deployed", agent: "agent0", workload: wid, body: ns},
		{name: "replayed", agent: "agent0", workload: "replayed1", body: ns},
		{name: "unknown workload", agent: "agent0", workload: "nosuch", body: ns, code: "404"},
		{name: "another nexlet's type", agent: "agent1", workload: wid, body: ns, code: "404"},
		{name: "unregistered nexlet", agent: "ghost", workload: wid, body: ns, code: "403"},
		{name: "no namespace", agent: "agent0", workload: wid, body: protocol.RenewCredsRequest{}, code: "400"},
		{name: "not JSON", agent: "agent0", workload: wid, body: []byte("{"), code: "400"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cd, code := f.renew(n, tc.agent, tc.workload, tc.body)
			if code != tc.code {
				t.Fatalf("code %q, want %q", code, tc.code)
			}
			if code == "" && cd.ConnName != "workload-tenant-"+tc.workload {
				t.Errorf("renewed creds %+v, want those of workload %s in tenant", cd, tc.workload)
			}
		})
	}

	// Once the workload ended, the node renews nothing for it.
	a.emitStopped(wid, "tenant")
	testkit.Eventually(t, "renewal refused after the workload ended", func() bool {
		_, code := f.renew(n, "agent0", wid, ns)
		return code == "404"
	})
}

func TestRenewCredsKeepsTheWorkloadsNamespace(t *testing.T) {
	sig, _ := nkeys.CreateAccount()
	seed, _ := sig.Seed()
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	m, err := mint.NewSigningKeyMinter(string(seed), accPub, mint.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// The fixture's nexlet uses the default inbox; private inboxes have their own test.
	f := newFixture(t, 1, func(_ int, o *Options) { o.Minter = sharedInbox{m} })
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	wid := f.deployOne("tenant")

	cd, code := f.renew(n, "agent0", wid, protocol.RenewCredsRequest{Namespace: "tenant"})
	if code != "" {
		t.Fatalf("renewal refused: %s", code)
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	if !uc.Tags.Contains("nex-namespace:tenant") || uc.Expires == 0 {
		t.Errorf("renewed user: tags %v, expires %d", uc.Tags, uc.Expires)
	}
	if !slicesHave(uc.Permissions.Pub.Allow, "tenant.>") {
		t.Errorf("renewed user may publish %v", uc.Permissions.Pub.Allow)
	}
	// Another namespace's creds for the same workload are refused.
	if _, code := f.renew(n, "agent0", wid, protocol.RenewCredsRequest{Namespace: "other"}); code != "403" {
		t.Errorf("renewal into another namespace: code %q, want 403", code)
	}
}

func slicesHave(l jwt.StringList, want string) bool {
	for _, s := range l {
		if strings.EqualFold(s, want) {
			return true
		}
	}
	return false
}

// sharedInbox lets a test nexlet on the default inbox talk to a signing-key minter.
type sharedInbox struct{ *mint.SigningKeyMinter }

func (sharedInbox) PrivateInboxes() bool { return false }

// TestRenewAgentCreds: a nexlet renews its own user for a key it made, signed with the
// key it registered with; an unsigned or wrongly signed request, a reused key, an
// unregistered nexlet and a nexlet that registered unsigned are refused, and the reply
// never holds a seed.
func TestRenewAgentCreds(t *testing.T) {
	sig, _ := nkeys.CreateAccount()
	seed, _ := sig.Seed()
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	m, err := mint.NewSigningKeyMinter(string(seed), accPub, mint.Options{AgentTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Minter = sharedInbox{m} })
	n := f.nodes[0]
	regKey, _ := nkeys.CreateUser()
	regPub, _ := regKey.PublicKey()
	other, _ := nkeys.CreateUser()
	n.SetAgentKey("agent0", regPub)
	f.healthyAgent(n, "agent0", "go_exec", "native", func(a *fakeAgent) { a.key = regKey })
	f.healthyAgent(n, "agent1", "other", "native", nil) // unsigned registration

	fresh := func() string {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		return pub
	}
	ask := func(agentID string, signer nkeys.KeyPair, req protocol.RenewAgentCredsRequest) (protocol.NatsConnectionData, string) {
		t.Helper()
		msg := nats.NewMsg(protocol.RenewAgentCredsSubject(n.ID(), agentID))
		msg.Data = mustJSON(t, req)
		if signer != nil {
			signAt(t, msg, signer, time.Now())
		}
		r, err := f.client.RequestMsg(msg, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if code := r.Header.Get(protocol.HeaderErrorCode); code != "" || req.Switched {
			return protocol.NatsConnectionData{}, code
		}
		var cd protocol.NatsConnectionData
		if err := protocol.Decode(r.Data, &cd); err != nil {
			t.Fatalf("renewal reply %q: %v", r.Data, err)
		}
		return cd, ""
	}
	pub := fresh()
	cd, code := ask("agent0", regKey, protocol.RenewAgentCredsRequest{PublicKey: pub})
	if code != "" {
		t.Fatalf("signed renewal refused: %s", code)
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	if uc.Subject != pub || cd.NatsUserSeed != "" || uc.Expires-uc.IssuedAt != 60 || !uc.Tags.Contains("nex-role:nexlet") {
		t.Fatalf("renewed user: subject %s (want %s), seed %q, lifetime %ds, tags %v", uc.Subject, pub, cd.NatsUserSeed, uc.Expires-uc.IssuedAt, uc.Tags)
	}
	if !slicesHave(uc.Permissions.Pub.Allow, protocol.RenewAgentCredsSubject(n.ID(), "agent0")) {
		t.Errorf("renewed user may not renew again: %v", uc.Permissions.Pub.Allow)
	}
	for _, tc := range []struct {
		name, agent string
		signer      nkeys.KeyPair
		req         protocol.RenewAgentCredsRequest
		code        string
	}{
		{"unsigned", "agent0", nil, protocol.RenewAgentCredsRequest{PublicKey: fresh()}, "403"},
		{"signed by another key", "agent0", other, protocol.RenewAgentCredsRequest{PublicKey: fresh()}, "403"},
		{"key used before", "agent0", regKey, protocol.RenewAgentCredsRequest{PublicKey: pub}, "400"},
		{"not a user key", "agent0", regKey, protocol.RenewAgentCredsRequest{PublicKey: regPub[:10]}, "400"},
		{"unregistered nexlet", "ghost", regKey, protocol.RenewAgentCredsRequest{PublicKey: fresh()}, "403"},
		{"nexlet registered unsigned", "agent1", other, protocol.RenewAgentCredsRequest{PublicKey: fresh()}, "403"},
		{"switch report unsigned", "agent0", nil, protocol.RenewAgentCredsRequest{PublicKey: pub, Switched: true}, "403"},
		{"switch report", "agent0", regKey, protocol.RenewAgentCredsRequest{PublicKey: pub, Switched: true}, ""},
	} {
		if _, code := ask(tc.agent, tc.signer, tc.req); code != tc.code {
			t.Errorf("%s: code %q, want %q", tc.name, code, tc.code)
		}
	}
}

// TestReplayedRenewalRefused: whoever captured a nexlet's signed renewal on the bus
// (an admin, any client of an open bus) publishes it again after the nexlet moved on
// to a newer user. Before, the node took it (the key it names had left the minter's
// memory when the nexlet switched), minted for it again and then revoked the users
// "before" it: the nexlet's current one, cutting the nexlet off. Now a signed message
// is taken once and only within the window of its time: the replay, a message signed
// long ago and one without a time are refused (403), and nothing is revoked for them.
func TestReplayedRenewalRefused(t *testing.T) {
	sig, _ := nkeys.CreateAccount()
	seed, _ := sig.Seed()
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	rec := &testkit.Revocations{}
	m, err := mint.NewSigningKeyMinter(string(seed), accPub, mint.Options{AgentTTL: time.Minute, Revoker: rec})
	if err != nil {
		t.Fatal(err)
	}
	const switchWait = 50 * time.Millisecond
	f := newFixture(t, 1, func(_ int, o *Options) { o.Minter = sharedInbox{m}; o.AgentSwitchWait = switchWait })
	n := f.nodes[0]
	regKey, _ := nkeys.CreateUser()
	regPub, _ := regKey.PublicKey()
	n.SetAgentKey("agent0", regPub)
	f.healthyAgent(n, "agent0", "go_exec", "native", func(a *fakeAgent) { a.key = regKey })

	signed := func(req protocol.RenewAgentCredsRequest, at time.Time, withTime bool) *nats.Msg {
		msg := nats.NewMsg(protocol.RenewAgentCredsSubject(n.ID(), "agent0"))
		msg.Data = mustJSON(t, req)
		ts := strconv.FormatInt(at.UnixNano(), 10)
		s, _ := regKey.Sign(protocol.RegistrationPayload(msg.Subject, ts, msg.Data))
		msg.Header.Set(protocol.HeaderRegistrationKey, regPub)
		if withTime {
			msg.Header.Set(protocol.HeaderRegistrationTime, ts)
		}
		msg.Header.Set(protocol.HeaderRegistrationSig, base64.StdEncoding.EncodeToString(s))
		return msg
	}
	send := func(msg *nats.Msg) (code, text string) {
		t.Helper()
		// A copy, as a replayer publishes it: same subject, body and headers.
		out := nats.NewMsg(msg.Subject)
		out.Data, out.Header = msg.Data, msg.Header
		r, err := f.client.RequestMsg(out, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return r.Header.Get(protocol.HeaderErrorCode), string(r.Data)
	}
	renew := func() (pub string, captured *nats.Msg) {
		t.Helper()
		kp, _ := nkeys.CreateUser()
		pub, _ = kp.PublicKey()
		captured = signed(protocol.RenewAgentCredsRequest{PublicKey: pub}, time.Now(), true)
		if code, text := send(captured); code != "" {
			t.Fatalf("renewal refused: %s %s", code, text)
		}
		if code, text := send(signed(protocol.RenewAgentCredsRequest{PublicKey: pub, Switched: true}, time.Now(), true)); code != "" {
			t.Fatalf("switch report refused: %s %s", code, text)
		}
		return pub, captured
	}
	second, captured := renew()
	testkit.Eventually(t, "the first user revoked once the nexlet switched", func() bool { return len(rec.Users()) > 0 })
	current, _ := renew()
	testkit.Eventually(t, "the second user revoked once the nexlet switched again", func() bool { return rec.Has(second) })

	for _, tc := range []struct {
		name, want string
		msg        *nats.Msg
	}{
		{"the captured renewal replayed", "replayed", captured},
		{"a renewal signed 10 minutes ago", "away from the node's clock", signed(protocol.RenewAgentCredsRequest{PublicKey: second}, time.Now().Add(-10*time.Minute), true)},
		{"a renewal signed without a time", protocol.HeaderRegistrationTime, signed(protocol.RenewAgentCredsRequest{PublicKey: second}, time.Now(), false)},
	} {
		if code, text := send(tc.msg); code != "403" || !strings.Contains(text, tc.want) {
			t.Errorf("%s: %q %s, want 403 saying %q", tc.name, code, text, tc.want)
		}
	}
	// The revocation a taken replay scheduled would have come after switchWait.
	time.Sleep(10 * switchWait)
	if rec.Has(current) {
		t.Fatalf("the nexlet's current user %s was revoked after the replay", current)
	}
}

// TestEarlyRenewalGetsTheNewestAgain: a renewal in the first half of the newest
// renewed user's lifetime (a nexlet that lost the answer and asks again, or one that
// asks too soon) gets that user again, and nothing is revoked for it; once past half
// the lifetime a renewal mints a new user and the older ones are revoked. A renewal
// after the workload was deployed again (a replay or a deploy under the same id mints
// the newest user) is not answered from before.
func TestEarlyRenewalGetsTheNewestAgain(t *testing.T) {
	sig, _ := nkeys.CreateAccount()
	seed, _ := sig.Seed()
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	rec := &testkit.Revocations{}
	const ttl = 4 * time.Second
	m, err := mint.NewSigningKeyMinter(string(seed), accPub, mint.Options{WorkloadTTL: ttl, Revoker: rec})
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Minter = sharedInbox{m}; o.RevokeGrace = 10 * time.Millisecond })
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	wid := f.deployOne("tenant")
	ns := protocol.RenewCredsRequest{Namespace: "tenant"}
	user := func(cd protocol.NatsConnectionData) string {
		t.Helper()
		uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
		if err != nil {
			t.Fatal(err)
		}
		return uc.Subject
	}

	first, code := f.renew(n, "agent0", wid, ns)
	if code != "" {
		t.Fatalf("renewal refused: %s", code)
	}
	deployed := m.WorkloadUsers(wid)[0]
	testkit.Eventually(t, "the deploy's user revoked after the first renewal", func() bool { return rec.Has(deployed) })
	again, code := f.renew(n, "agent0", wid, ns)
	if code != "" || again.NatsUserJWT != first.NatsUserJWT || again.NatsUserSeed != first.NatsUserSeed {
		t.Fatalf("a renewal right after the first got %s (code %q), want the first's user %s again", user(again), code, user(first))
	}
	time.Sleep(50 * time.Millisecond) // a revocation the early renewal scheduled would come after the grace
	if rec.Has(user(first)) {
		t.Fatal("the early renewal revoked the user it handed out")
	}
	if at := reuseUntil(first); time.Until(at) > ttl/2 {
		t.Fatalf("the first renewed user is handed out again until %v from now; want at most half of its %v", time.Until(at), ttl)
	}
	var later protocol.NatsConnectionData
	testkit.Eventually(t, "a new user once past half the lifetime", func() bool {
		later, code = f.renew(n, "agent0", wid, ns)
		return code == "" && later.NatsUserJWT != first.NatsUserJWT
	})
	testkit.Eventually(t, "the first renewed user revoked after the later one", func() bool { return rec.Has(user(first)) })
	if rec.Has(user(later)) {
		t.Fatal("the newest user was revoked")
	}

	// Deployed again under the same id (as a replay does): the deploy's user is the
	// newest, and the next renewal mints rather than handing back the older one.
	n.mu.Lock()
	o := n.owned[wid]
	n.mu.Unlock()
	res := &reservation{n: n, id: wid, typ: o.typ, ns: o.ns, name: o.name}
	n.mu.Lock()
	for _, a := range n.agents {
		if a.owner == o.owner {
			res.agent = a
			a.startsInFlight++
		}
	}
	n.mu.Unlock()
	res.commit(true)
	after, code := f.renew(n, "agent0", wid, ns)
	if code != "" || after.NatsUserJWT == later.NatsUserJWT {
		t.Fatalf("a renewal after the workload's deploy again got the user renewed before it (code %q)", code)
	}
}
