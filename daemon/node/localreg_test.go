package node

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// unstartedNode is a fixture's node before Start (the native nexlet starts before
// the node serves); the test starts and stops it.
func unstartedNode(t testing.TB, srv *server.Server) *Node {
	t.Helper()
	kp, _ := nkeys.CreateServer()
	xk, _ := nkeys.CreateCurveKeys()
	n, err := New(Options{NC: testnats.Connect(t, srv), NodeKey: kp, XKey: xk, Name: "local", Nexus: "testnexus",
		Version: "0.1.0", Minter: testMinter{url: srv.ClientURL(), can: true}, Store: NewMemStore(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Stop(ctx)
	})
	return n
}

// localPair is a channel as the nexlets manager makes it for a start of the native
// nexlet: the node's end given to the node with the start's key, the nexlet's end
// returned.
func localPair(t testing.TB, n *Node, agentID, key string) (*localchan.Client, *localchan.Server) {
	t.Helper()
	c, s := localEnds(t)
	n.SetAgentLocal(agentID, key, c)
	return c, s
}

// localEnds is a connected channel: the node's end and the nexlet's, closed when t ends.
func localEnds(t testing.TB) (*localchan.Client, *localchan.Server) {
	t.Helper()
	nodeEnd, nexletEnd, err := localchan.Pair()
	if err != nil {
		t.Fatal(err)
	}
	c, err := localchan.NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	s, err := localchan.NewServer(nexletEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// nativeOnChannel expects native0, a native nexlet started with a fresh key and holding
// a channel, and returns that start's key and the nexlet's end of its channel.
func nativeOnChannel(t testing.TB, n *Node) (kp nkeys.KeyPair, pub string, s *localchan.Server) {
	t.Helper()
	kp, pub = newKey(t)
	n.ExpectAgent("native0", "native")
	n.SetAgentKey("native0", pub)
	_, s = localPair(t, n, "native0", pub)
	return kp, pub, s
}

// signedRegistration is a native nexlet's registration for agentID, signed with kp (nil:
// unsigned).
func signedRegistration(t testing.TB, nodeID, agentID string, kp nkeys.KeyPair) *nats.Msg {
	t.Helper()
	m := nats.NewMsg(protocol.RegisterSubject(nodeID, agentID))
	m.Data = mustJSON(t, protocol.RegisterAgentRequest{Name: "native", RegisterType: "native", Version: "1.0.0",
		StartRequestSchema: testSchema, SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleJob}})
	if kp != nil {
		signAt(t, m, kp, time.Now())
	}
	return m
}

// callCode sends m on s and returns the node's error code ("" accepted) and reply.
func callCode(t testing.TB, s *localchan.Server, m *nats.Msg) (string, *nats.Msg) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := s.Call(ctx, m.Subject, m.Header, m.Data)
	if err != nil {
		t.Fatalf("call %s: %v", m.Subject, err)
	}
	return r.Header.Get(protocol.HeaderErrorCode), r
}

func newKey(t testing.TB) (nkeys.KeyPair, string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	return kp, pub
}

// TestRegistrationOnLocalChannel: the native nexlet's registration on its channel
// waits there until the node serves (the nexlet starts first), is accepted when signed
// with the key of the start that holds the channel, and the registration then has the
// channel for its starts. Nothing of it crosses the NATS server.
func TestRegistrationOnLocalChannel(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	watch := testnats.Connect(t, srv)
	crossed, _ := watch.SubscribeSync(protocol.AgentPrefix("*") + ".REGISTER.>")
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}
	n := unstartedNode(t, srv)
	kp, pub := newKey(t)
	n.ExpectAgent("native0", "native")
	n.SetAgentKey("native0", pub)
	c, s := localPair(t, n, "native0", pub)

	answer := make(chan *nats.Msg, 1)
	go func() {
		m := signedRegistration(t, n.ID(), "native0", kp)
		r, err := s.Call(context.Background(), m.Subject, m.Header, m.Data)
		if err != nil {
			t.Error(err)
		}
		answer <- r
	}()
	select {
	case r := <-answer:
		t.Fatalf("answered before the node served: %v %q", r.Header, r.Data)
	case <-time.After(100 * time.Millisecond):
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var r *nats.Msg
	select {
	case r = <-answer:
	case <-time.After(10 * time.Second):
		t.Fatal("the registration on the channel was not answered once the node served")
	}
	if r == nil || r.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("registration refused: %v", r)
	}
	var resp protocol.RegisterAgentResponse
	if err := protocol.Decode(r.Data, &resp); err != nil || !resp.Success || resp.NodeID != n.ID() || len(resp.ConnectionData.NatsServers) == 0 {
		t.Fatalf("reply %+v (%v)", resp, err)
	}
	n.mu.Lock()
	reg := n.agents["native0"]
	n.mu.Unlock()
	if reg == nil || reg.local != c || reg.owner != "local:native" || reg.key != pub {
		t.Fatalf("registration %+v, want it local:native with the channel", reg)
	}
	if m, err := crossed.NextMsg(200 * time.Millisecond); err == nil {
		t.Fatalf("a registration crossed NATS: %s", m.Subject)
	}
}

// TestAttackRegistrationOnLocalChannel: what holds a native nexlet's channel is held
// to what a registration over NATS is, and to the channel's own start: unsigned, signed
// by another key, for another agent id, another call, signed with a newer start's key
// on an older start's channel, unsigned on the channel of a start without a key: each
// refused and logged, none registered. A control: the same signed registration is
// accepted on the channel of its own start.
func TestAttackRegistrationOnLocalChannel(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	kp, pub := newKey(t)
	other, _ := newKey(t)
	n.ExpectAgent("native0", "native")
	n.SetAgentKey("native0", pub)
	_, s := localPair(t, n, "native0", pub)

	forged := func(what, want string, m *nats.Msg) {
		t.Helper()
		code, r := callCode(t, s, m)
		if code != want {
			t.Fatalf("%s: code %q (%q), want %s", what, code, r.Data, want)
		}
		n.mu.Lock()
		_, in := n.agents["native0"]
		n.mu.Unlock()
		if in {
			t.Fatalf("%s: registered", what)
		}
	}
	forged("unsigned", "403", signedRegistration(t, n.ID(), "native0", nil))
	forged("signed by another key", "403", signedRegistration(t, n.ID(), "native0", other))
	n.ExpectAgent("native1", "native-1")
	n.SetAgentKey("native1", pub)
	forged("another agent id", "400", signedRegistration(t, n.ID(), "native1", kp))
	hb := signedRegistration(t, n.ID(), "native0", kp)
	hb.Subject = protocol.AgentHeartbeatSubject(n.ID(), "native0")
	forged("another call", "400", hb)
	renew := signedRegistration(t, n.ID(), "native0", kp)
	renew.Subject = protocol.RenewAgentCredsSubject(n.ID(), "native0")
	forged("a renewal", "400", renew)

	// A newer start of the nexlet has its own key: a registration signed with it does
	// not belong on the older start's channel.
	newer, newerPub := newKey(t)
	n.SetAgentKey("native0", newerPub)
	forged("the newer start's key on the older start's channel", "403", signedRegistration(t, n.ID(), "native0", newer))
	n.SetAgentKey("native0", pub)

	// A start without a key (unsigned_registration) is accepted unsigned over NATS,
	// never on a channel: the channel's registration must be signed.
	n.ExpectAgent("plain0", "plain")
	_, ps := localPair(t, n, "plain0", "")
	if code, r := callCode(t, ps, signedRegistration(t, n.ID(), "plain0", nil)); code != "403" {
		t.Fatalf("unsigned on a keyless start's channel: code %q (%q), want 403", code, r.Data)
	}

	if code, r := callCode(t, s, signedRegistration(t, n.ID(), "native0", kp)); code != "" {
		t.Fatalf("control: the start's own registration refused: %s %q", code, r.Data)
	}
	n.mu.Lock()
	reg := n.agents["native0"]
	n.mu.Unlock()
	if reg == nil || reg.local == nil {
		t.Fatal("control: not registered with its channel")
	}
}

// BenchmarkRegistrationLeg: one registration of the native nexlet, sent, handled by
// the node and answered: on its local channel; over NATS (a loopback server in this
// process) on a connection of the nexlet's made before; and over NATS as the nexlet's
// start did it, on a connection it makes for the registration (it dialled ahead, but
// its connect shares the start's CPU) and closes after.
func BenchmarkRegistrationLeg(b *testing.B) {
	f := newFixture(b, 1, nil)
	n := f.nodes[0]
	kp, _, s := nativeOnChannel(b, n)
	m := signedRegistration(b, n.ID(), "native0", kp)
	b.Run("pair", func(b *testing.B) {
		for b.Loop() {
			signAt(b, m, kp, time.Now()) // as every leg: the nexlet signs each registration
			if code, r := callCode(b, s, m); code != "" {
				b.Fatalf("refused: %s %q", code, r.Data)
			}
		}
	})
	b.Run("nats", func(b *testing.B) {
		nc := testnats.Connect(b, f.srv)
		for b.Loop() {
			signAt(b, m, kp, time.Now()) // over NATS the node takes a signed message once
			r, err := nc.RequestMsg(m, 10*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			if code := r.Header.Get(protocol.HeaderErrorCode); code != "" {
				b.Fatalf("refused: %s %q", code, r.Data)
			}
		}
	})
	b.Run("nats-new-connection", func(b *testing.B) {
		for b.Loop() {
			nc, err := nats.Connect(f.srv.ClientURL())
			if err != nil {
				b.Fatal(err)
			}
			signAt(b, m, kp, time.Now())
			r, err := nc.RequestMsg(m, 10*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			if code := r.Header.Get(protocol.HeaderErrorCode); code != "" {
				b.Fatalf("refused: %s %q", code, r.Data)
			}
			nc.Close()
		}
	})
}

// blockingStore holds ByType until release is closed.
type blockingStore struct {
	*MemStore
	entered chan struct{}
	release chan struct{}
}

func (b blockingStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.MemStore.ByType(ctx, typ)
}

// writeCall writes a call frame as localchan frames it (a nexlet that does not wait
// for its answers: Server.Call does).
func writeCall(t testing.TB, w io.Writer, id uint64, m *nats.Msg) {
	t.Helper()
	hdr, _ := json.Marshal(m.Header)
	n := 1 + 8 + 2 + len(m.Subject) + 4 + len(hdr) + len(m.Data)
	b := binary.BigEndian.AppendUint32(nil, uint32(n))
	b = append(b, 4) // a call
	b = binary.BigEndian.AppendUint64(b, id)
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Subject)))
	b = append(b, m.Subject...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(hdr)))
	b = append(append(b, hdr...), m.Data...)
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
}

// readAnswer reads one frame and returns its call id and error code.
func readAnswer(t testing.TB, r io.Reader) (uint64, string) {
	t.Helper()
	var lb [4]byte
	if _, err := io.ReadFull(r, lb[:]); err != nil {
		t.Fatalf("no answer read: %v", err)
	}
	b := make([]byte, binary.BigEndian.Uint32(lb[:]))
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatal(err)
	}
	id := binary.BigEndian.Uint64(b[1:9])
	b = b[11+int(binary.BigEndian.Uint16(b[9:11])):]
	var hdr nats.Header
	if hl := int(binary.BigEndian.Uint32(b[:4])); hl > 0 {
		if err := json.Unmarshal(b[4:4+hl], &hdr); err != nil {
			t.Fatal(err)
		}
	}
	return id, hdr.Get(protocol.HeaderErrorCode)
}

// TestLocalCallsOneAtATime: calls a nexlet sends on its channel without waiting for
// the answers do not each get a goroutine: while one is handled, the others are
// answered 429 at once; the one handled is answered when it is done.
func TestLocalCallsOneAtATime(t *testing.T) {
	bs := blockingStore{MemStore: NewMemStore(), entered: make(chan struct{}, 4), release: make(chan struct{})}
	f := newFixture(t, 1, func(_ int, o *Options) { o.Store = bs })
	n := f.nodes[0]
	kp, pub := newKey(t)
	n.ExpectAgent("native0", "native")
	n.SetAgentKey("native0", pub)
	nodeEnd, nexletEnd, err := localchan.Pair()
	if err != nil {
		t.Fatal(err)
	}
	c, err := localchan.NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); nexletEnd.Close() })
	// An answer that never comes (a call parked behind the handled one) fails the test
	// instead of hanging it until go test's timeout: shutting the socket down ends the
	// blocked read (closing the file would wait for it).
	fd := int(nexletEnd.Fd())
	hung := time.AfterFunc(30*time.Second, func() { _ = unix.Shutdown(fd, unix.SHUT_RDWR) })
	t.Cleanup(func() { hung.Stop() })
	released := false
	t.Cleanup(func() {
		if !released {
			close(bs.release)
		}
	})
	n.SetAgentLocal("native0", pub, c)
	m := signedRegistration(t, n.ID(), "native0", kp)
	writeCall(t, nexletEnd, 1, m)
	select {
	case <-bs.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first call was not handled")
	}
	for id := uint64(2); id <= 4; id++ {
		writeCall(t, nexletEnd, id, m)
		if got, code := readAnswer(t, nexletEnd); got != id || code != "429" {
			t.Fatalf("call %d while one is handled: answer to %d, code %q; want 429", id, got, code)
		}
	}
	close(bs.release)
	released = true
	if got, code := readAnswer(t, nexletEnd); got != 1 || code != "" {
		t.Fatalf("the handled call: answer to %d, code %q", got, code)
	}
}

// TestStaleLocalRegistrationDropped: a nexlet that gave up waiting for the node on its
// channel (a register timeout: it closes its end) registers over NATS instead. Its
// registration kept on the channel until the node served is dropped then, not
// registered a second time (which would replace the one over NATS and revoke its
// credentials). The one over NATS stands.
func TestStaleLocalRegistrationDropped(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	n := unstartedNode(t, srv)
	kp, _, s := nativeOnChannel(t, n)
	m := signedRegistration(t, n.ID(), "native0", kp)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Call(ctx, m.Subject, m.Header, m.Data); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call before the node serves: %v, want the nexlet's timeout", err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	n.inflight.Wait() // the kept registration was handled
	n.mu.Lock()
	_, in := n.agents["native0"]
	n.mu.Unlock()
	if in {
		t.Fatal("the registration the nexlet gave up on its channel was registered")
	}
	// Its fallback over NATS is the registration.
	nc := testnats.Connect(t, srv)
	r, err := nc.RequestMsg(m, 10*time.Second)
	if err != nil {
		t.Fatalf("registration over NATS: %v", err)
	}
	if r.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("registration over NATS refused: %v %q", r.Header, r.Data)
	}
	n.mu.Lock()
	reg := n.agents["native0"]
	n.mu.Unlock()
	if reg == nil || (reg.local != nil && reg.local.Serving()) {
		t.Fatalf("registration %+v, want the one over NATS, starts not on the closed channel", reg)
	}
}

// TestKeptLocalRegistrationOutlivesTheWindow: the native nexlet starts while nexd
// connects and registers on its channel patiently, so its registration waits there
// for as long as the node takes to serve (NATS down at boot: minutes). Signed when it
// was sent, it is older than protocol.RegistrationWindow by then; it never crossed the
// bus (nobody could have captured it), so it is taken. Before, it was refused as "a
// replayed copy, or the nexlet's clock is off" and the nexlet exited to be restarted.
func TestKeptLocalRegistrationOutlivesTheWindow(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	n := unstartedNode(t, srv)
	kp, pub, s := nativeOnChannel(t, n)
	m := signedRegistration(t, n.ID(), "native0", nil)
	// Signed as the nexlet did when it sent it, a window and a minute before the node
	// serves.
	signAt(t, m, kp, time.Now().Add(-protocol.RegistrationWindow-time.Minute))
	answer := make(chan *nats.Msg, 1)
	go func() {
		r, err := s.Call(context.Background(), m.Subject, m.Header, m.Data) // patient
		if err != nil {
			t.Error(err)
		}
		answer <- r
	}()
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var r *nats.Msg
	select {
	case r = <-answer:
	case <-time.After(10 * time.Second):
		t.Fatal("the kept registration was not answered once the node served")
	}
	if r == nil {
		t.Fatal("the kept registration got no answer")
	}
	if r.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("the kept registration was refused: %v %q", r.Header, r.Data)
	}
	n.mu.Lock()
	reg := n.agents["native0"]
	n.mu.Unlock()
	if reg == nil || reg.key != pub {
		t.Fatalf("registration %+v, want native0 registered with its start's key", reg)
	}
}

// holdFirstAgentMint holds the first nexlet user mint until release is closed
// (entered is closed when it starts), and every revocation of nexlet users until that
// mint is done: a test's hook into a registration between its checks and its mint.
type holdFirstAgentMint struct {
	*mint.SigningKeyMinter
	held                     atomic.Bool
	entered, release, minted chan struct{}
	revoking                 chan struct{} // a revocation began (buffered)
}

func (m *holdFirstAgentMint) MintAgent(agentID, nodeID string, direct bool) (protocol.NatsConnectionData, error) {
	if !m.held.CompareAndSwap(false, true) {
		return m.SigningKeyMinter.MintAgent(agentID, nodeID, direct)
	}
	close(m.entered)
	<-m.release
	defer close(m.minted)
	return m.SigningKeyMinter.MintAgent(agentID, nodeID, direct)
}

func (m *holdFirstAgentMint) RevokeAgentBefore(ctx context.Context, agentID, userPub string) error {
	select {
	case m.revoking <- struct{}{}:
	default:
	}
	<-m.minted
	return m.SigningKeyMinter.RevokeAgentBefore(ctx, agentID, userPub)
}

// TestDroppedLocalRegistrationKeepsTheLiveUser: a nexlet gives up waiting on its channel
// while the node serves its registration there and registers over NATS; the one over
// NATS mints its user first, then the one on the channel mints its own and is dropped
// (the nexlet is gone from the channel). Before, the registration's revocation of
// superseded users revoked every user but the newest minted, the dropped one's, so it
// cut the user the nexlet connects with. Now it revokes the users minted before the
// registration's own: the nexlet's user stays valid, its registration user is revoked.
// A real operator-mode server checks both.
func TestDroppedLocalRegistrationKeepsTheLiveUser(t *testing.T) {
	op, rev := revokingOperator(t, 48*time.Hour)
	sm := newSigningMinter(t, op, mint.Options{Revoker: rev})
	m := &holdFirstAgentMint{SigningKeyMinter: sm, entered: make(chan struct{}), release: make(chan struct{}), minted: make(chan struct{}),
		revoking: make(chan struct{}, 4)}
	kp, _ := nkeys.CreateServer()
	xk, _ := nkeys.CreateCurveKeys()
	n, err := New(Options{NC: op.Connect(t, "node"), NodeKey: kp, XKey: xk, Name: "local", Nexus: "testnexus",
		Version: "0.1.0", Minter: m, Store: NewMemStore(), Logger: testLogger(t), RevokeGrace: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	released := false
	t.Cleanup(func() {
		if !released {
			close(m.release)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = n.Stop(ctx)
	})
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	regKey, _, s := nativeOnChannel(t, n)

	// The registration on the channel reaches its mint; the nexlet gives up then.
	ctx, cancel := context.WithCancel(context.Background())
	gaveUp := make(chan error, 1)
	go func() {
		m := signedRegistration(t, n.ID(), "native0", regKey)
		_, err := s.Call(ctx, m.Subject, m.Header, m.Data)
		gaveUp <- err
	}()
	select {
	case <-m.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the registration on the channel did not reach its mint")
	}
	cancel()
	if err := <-gaveUp; !errors.Is(err, context.Canceled) {
		t.Fatalf("the nexlet's call on its channel: %v, want its give-up", err)
	}

	// It registers over NATS, with the registration user its node minted for it.
	regCreds, err := sm.MintRegister("native0", n.ID())
	if err != nil {
		t.Fatal(err)
	}
	dial := func(cd protocol.NatsConnectionData) (*nats.Conn, error) {
		return nats.Connect(op.Server.ClientURL(), nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
			nats.CustomInboxPrefix(cd.InboxPrefix), nats.NoReconnect())
	}
	rc, err := dial(regCreds)
	if err != nil {
		t.Fatalf("connect with the registration user: %v", err)
	}
	defer rc.Close()
	r, err := rc.RequestMsg(signedRegistration(t, n.ID(), "native0", regKey), 10*time.Second)
	if err != nil {
		t.Fatalf("registration over NATS: %v", err)
	}
	var resp protocol.RegisterAgentResponse
	if err := json.Unmarshal(r.Data, &resp); err != nil || !resp.Success {
		t.Fatalf("registration over NATS: %v %q (%v)", r.Header, r.Data, err)
	}
	live, err := dial(resp.ConnectionData)
	if err != nil {
		t.Fatalf("the nexlet connects with its user: %v", err)
	}
	defer live.Close()

	// The registration over NATS schedules its revocation after its reply: wait until
	// it runs (held until the mint below), so its goroutine is counted before the
	// Wait below. Before, under -race the deferred call came after the channel's
	// handler had ended, and its inflight.Add raced the Wait at zero.
	select {
	case <-m.revoking:
	case <-time.After(10 * time.Second):
		t.Fatal("the registration over NATS did not revoke its superseded users")
	}
	// The registration held on the channel mints now, and is dropped.
	close(m.release)
	released = true
	n.inflight.Wait() // it was handled; the revocations after the grace ran
	if c, err := dial(resp.ConnectionData); err != nil {
		t.Fatalf("the nexlet's user was revoked: connect: %v", err)
	} else {
		c.Close()
	}
	if err := live.Flush(); err != nil || !live.IsConnected() {
		t.Fatalf("the nexlet's connection was cut: %v", err)
	}
	if c, err := dial(regCreds); err == nil {
		c.Close()
		t.Fatal("the nexlet's registration user was not revoked")
	}
}
