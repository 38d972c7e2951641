package node

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// AttackNexletReregistrationFlood is TestAttackNexletReregistrationFloodBounded (in
// dropmetrics_test.go, which then scrapes the metric of its drops), returning its node:
// a rogue nexlet that signs registers again and again under its own agent id, signed
// with its start's key, from the user its node minted for it on an operator-mode
// server, while the node has given it workloads. Each registration the node takes mints
// a nexlet user, revokes the older ones, and hands back every workload of the nexlet
// with a fresh user minted for it, which the minter keeps until the workload ends and
// then revokes, one rewrite of the account JWT each. Before, every registration was
// served: 100 registrations, 100 more users for each of its 3 workloads (303 in all),
// each to be revoked at its end. Now a registration of a nexlet already registered in
// this node process counts against the same bound as its renewals of its own user
// (10 at once, 8 over its user's lifetime); the rest are dropped unanswered.
func AttackNexletReregistrationFlood(t *testing.T) *Node {
	rf := newRogueFixtureMinting(t, mint.Options{AgentTTL: time.Hour})
	n := rf.nodes[0]
	signed := signedStart(n, true)
	victim := rf.minted("agent0", "native-nexlet", "native", signed)
	rogue := rf.minted("rogue0", "rogue", "rogue", signed)
	wids := []string{rf.deployOnRogue(), rf.deployOnRogue(), rf.deployOnRogue()}
	users := func() int {
		total := 0
		for _, wid := range wids {
			total += len(rf.m.WorkloadUsers(wid))
		}
		return total
	}
	before := users()

	const registrations = 100
	body := mustJSON(t, rogue.req)
	answered := floodSigned(t, rogue, protocol.RegisterSubject(n.ID(), rogue.id), registrations, func(int) []byte { return body })
	if !testkit.WaitFor(2*time.Minute, func() bool { return answered.Load()+int64(n.ReregistrationsDropped()) >= registrations }) {
		t.Fatalf("of %d registrations, %d answered and %d dropped within 2 minutes", registrations, answered.Load(), n.ReregistrationsDropped())
	}
	grew := users() - before
	t.Logf("%d registrations of the rogue: %d answered, %d dropped; %d more users kept for its %d workloads", registrations, answered.Load(), n.ReregistrationsDropped(), grew, len(wids))
	if most := len(wids) * agentRenewBurst; grew > most {
		t.Errorf("the rogue's %d registrations left %d more users of its %d workloads to revoke; want at most %d", registrations, grew, len(wids), most)
	}
	// The honest nexlet still renews its own user.
	rf.renewed(victim).Close()
	return n
}

// readDeadlineStore is the node's state bucket whose reads by type (a registration's)
// give up after wait: with the server's JetStream off each would wait out the
// JetStream API's 5 s, and the test below, which counts refusals, take minutes.
type readDeadlineStore struct {
	*state.KV
	wait time.Duration
}

func (s readDeadlineStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	ctx, cancel := context.WithTimeout(ctx, s.wait)
	defer cancel()
	return s.KV.ByType(ctx, typ)
}

// TestHonestReregistrationsNotDropped (faults: node state unreadable, the server
// restarted): an honest nexlet registered with the node registers again, signed with
// its start's key on its own connection as nexd's SDK does (Reregister asks again after
// any failure: a lost answer, a refusal while the node cannot read its state), on an
// operator-mode server whose JetStream holds the node's state bucket. None of these is
// dropped by the bound of registrations again. While the server's JetStream is off,
// 2×agentRenewBurst registrations are each refused 503 (the SDK's retries of an
// outage); the server is then restarted on its store (the node and the nexlet
// reconnect), and the nexlet's registration is served with its service handed back.
// Its bucket used up, as a rogue's flood would (some dropped), a new start of the
// nexlet (a new key) and then a restarted nexd (a new process) serve its registration
// at once. Before the 503 gave its token back,
// the 11th registration in the outage was dropped unanswered (the SDK waits a minute
// for an answer, then asks again), and with its bucket empty so was every one until
// it refilled a token, 1/8 of its user's lifetime (7.5 minutes of an hour's), also
// once the state read again.
func TestHonestReregistrationsNotDropped(t *testing.T) {
	op := testnats.NewOperator(t, nil)
	var storeDir string
	op.Server = testnats.Start(t, testnats.Options{Configure: func(so *server.Options) { op.Configure(so); storeDir = so.StoreDir }})
	port := op.Server.Addr().(*net.TCPAddr).Port
	reconnecting := func(name string) *nats.Conn {
		tok, seed := op.User(t, name, nil)
		return testnats.Connect(t, op.Server, nats.UserJWTAndSeed(tok, seed), nats.Name(name),
			nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	}
	nd, st, m := startMintingNode(t, op, mint.Options{AgentTTL: time.Hour}, "node-0", func(o *Options) {
		pub, _ := o.NodeKey.PublicKey()
		kv, err := state.OpenKV(t.Context(), reconnecting("node-state"), pub, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		o.NC, o.Store = reconnecting("node-0"), readDeadlineStore{KV: kv, wait: time.Second}
	})
	rf := &rogueFixture{fixture: &fixture{t: t, srv: op.Server, client: reconnecting("client"), nodes: []*Node{nd}, stores: []*MemStore{st}}, op: op, m: m}
	a := rf.minted("agent0", "native-nexlet", "native", signedStart(nd, true))
	wid := rf.deployIn(t, "tenant", "svc")

	// again registers a again as Reregister does: signed, on its own connection,
	// keeping it. It returns the answer's error code and body, or dropped.
	again := func(n *Node) (code string, body []byte, dropped bool) {
		t.Helper()
		msg := nats.NewMsg(protocol.RegisterSubject(n.ID(), a.id))
		msg.Data = mustJSON(t, a.req)
		signAt(t, msg, a.key, time.Now())
		from := n.ReregistrationsDropped()
		r, err := a.nc.RequestMsg(msg, 10*time.Second)
		if errors.Is(err, nats.ErrTimeout) && n.ReregistrationsDropped() > from {
			return "", nil, true
		}
		if err != nil {
			t.Fatalf("registration again: %v", err)
		}
		return r.Header.Get(protocol.HeaderErrorCode), r.Data, false
	}
	// served registers a again until it is served (503s while the state is not read
	// yet are asked again, as the SDK does) and says what it was handed back.
	served := func(n *Node) (protocol.RegisterAgentResponse, int) {
		t.Helper()
		refusals := 0
		for deadline := time.Now().Add(time.Minute); ; {
			code, body, dropped := again(n)
			switch {
			case dropped:
				t.Fatalf("registration again dropped unanswered by the bound of registrations again (after %d refused 503)", refusals)
			case code == "":
				var resp protocol.RegisterAgentResponse
				if err := protocol.Decode(body, &resp); err != nil {
					t.Fatal(err)
				}
				return resp, refusals
			case code != "503" || time.Now().After(deadline):
				t.Fatalf("registration again: %s %s (after %d refusals 503)", code, body, refusals)
			}
			refusals++
			time.Sleep(100 * time.Millisecond)
		}
	}

	// The state bucket unreadable: each registration again refused, none dropped.
	if err := op.Server.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	refused := 0
	for i := range 2 * agentRenewBurst {
		code, body, dropped := again(nd)
		if dropped {
			t.Fatalf("registration again %d, while node state was unreadable, dropped unanswered after %d refused 503", i+1, refused)
		}
		if code != "503" {
			t.Fatalf("registration again while node state is unreadable: %q %s, want 503", code, body)
		}
		refused++
	}

	// The server restarted on its store: JetStream back, and every connection
	// reconnected. The nexlet's registration is served and hands its service back.
	op.Server.Shutdown()
	op.Server.WaitForShutdown()
	op.Server = testnats.Start(t, testnats.Options{Configure: func(so *server.Options) {
		op.Configure(so)
		so.StoreDir, so.Port = storeDir, port
	}})
	testkit.Eventually(t, "the node and the nexlet reconnected", func() bool { return nd.o.NC.IsConnected() && a.nc.IsConnected() })
	resp, recovering := served(nd)
	if _, ok := resp.ExistingState[wid]; !ok {
		t.Fatalf("the registration once the state reads again handed back %d workloads, not the service %s", len(resp.ExistingState), wid)
	}

	// Its bucket used up, as a flood would: then nexd restarts.
	const flood = agentRenewBurst + 1
	answered := floodSigned(t, a, protocol.RegisterSubject(nd.ID(), a.id), flood, func(int) []byte { return mustJSON(t, a.req) })
	if !testkit.WaitFor(2*time.Minute, func() bool { return answered.Load()+int64(nd.ReregistrationsDropped()) >= flood }) {
		t.Fatalf("of %d registrations, %d answered and %d dropped within 2 minutes", flood, answered.Load(), nd.ReregistrationsDropped())
	}
	used := nd.ReregistrationsDropped()
	if used == 0 {
		t.Fatalf("%d registrations again in a row all served: the bound dropped none", flood)
	}
	// A new start of the nexlet (a new key) while its predecessor's registration is
	// still held (its exit not seen yet) is not one again.
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	a.key = kp
	nd.SetAgentKey(a.id, pub)
	if resp, _ = served(nd); len(resp.ExistingState) != 1 {
		t.Fatalf("the new start's registration handed back %d workloads, want its service", len(resp.ExistingState))
	}
	n := rf.restartNode()
	n.ExpectAgent(a.id, a.req.Name)
	n.SetAgentKey(a.id, pub)
	resp, _ = served(n)
	if _, ok := resp.ExistingState[wid]; !ok {
		t.Fatalf("the registration with the restarted nexd handed back %d workloads, not the service %s", len(resp.ExistingState), wid)
	}
	t.Logf("while node state was unreadable: %d registrations again refused 503, none dropped; after the server's restart: served after %d more 503s, the service handed back; bucket used up (%d of %d dropped), then a new start's served at once, and with a restarted nexd",
		refused, recovering, used, flood)
}
