package node

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackNexletForgesIntoNodeWatcher: the node's own connection named nats.go's
// inboxes _INBOX.<nuid>, from one generator per process (one prefix, a fixed
// increment), and every request it sends a nexlet carries one of them in its reply
// subject (its random token comes after). A rogue nexlet learns the generator from a
// few of them and, with a workload user of one of its workloads (which may publish to
// _INBOX.> to answer requests), sprays the inboxes the node names next. The state
// bucket's watcher, which the node opens at every registration, is a JetStream push
// subscription, and nats.go answers a heartbeat on it that carries
// Nats-Consumer-Stalled by publishing an empty message to the subject in that header,
// with the node's rights: an empty $JS.API.STREAM.DELETE deletes a stream. Before, the
// rogue had the node delete its own state bucket (every workload's record) and
// tenant-b's object store. The node's connection now makes its inboxes under a prefix
// of its own (_INBOX_nexd.<random>) that no workload, tenant or nexlet may publish to:
// the sprays are refused by the server and both streams stay.
func TestAttackNexletForgesIntoNodeWatcher(t *testing.T) {
	var kv *state.KV
	var nodeNC *nats.Conn
	op := testnats.StartOperator(t, nil)
	nd, st, m := startMintingNode(t, op, mint.Options{}, "node-0", func(o *Options) {
		// The node's connection as nexd makes it (natsconn, with the inbox prefix of
		// daemon's natsOptions: TestNodeConnectionInboxPrefix), holding the state bucket.
		jwt, seed := op.User(t, "node", nil)
		c, err := natsconn.Connect(t.Context(), natsconn.Options{Servers: []string{op.Server.ClientURL()}, JWT: jwt, Seed: seed,
			InboxPrefix: protocol.NodeInboxPrefix(randid.New())}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		nodeNC = c.NC
		pub, _ := o.NodeKey.PublicKey()
		if kv, err = state.OpenKV(t.Context(), c.NC, pub, "", nil); err != nil {
			t.Fatal(err)
		}
		o.NC, o.Store = c.NC, kv
	})
	rf := &rogueFixture{fixture: &fixture{t: t, srv: op.Server, client: op.Connect(t, "client"), nodes: []*Node{nd}, stores: []*MemStore{st}}, op: op, m: m}
	n := rf.nodes[0]
	ctx := t.Context()
	js, err := jetstream.New(rf.client)
	if err != nil {
		t.Fatal(err)
	}
	// Tenant-b's artifacts, and a node that holds workloads (their records make the
	// watcher live a little longer, as on any busy node).
	rf.putObject(ctx, "tenant-b", "app", []byte("tenant-b's binary"))
	for i := range 20 {
		req := startReq("tenant-c", fmt.Sprintf("w%d", i), `{"cmd":"x"}`)
		req.Owner = "local:elsewhere"
		if err := kv.Put(ctx, "other", randid.New(), req); err != nil {
			t.Fatal(err)
		}
	}
	targets := []string{"KV_" + state.BucketName(n.ID()), "OBJ_tenant-b"}

	rogue := rf.minted("rogue1", "rogue", "native", nil)
	seen, err := rogue.nc.SubscribeSync(protocol.AgentPrefix(n.ID()) + ".rogue1.>")
	if err != nil {
		t.Fatal(err)
	}
	cd, err := rf.m.MintWorkload("tenant-a", randid.New()) // a workload it runs
	if err != nil {
		t.Fatal(err)
	}
	var refused, sent atomic.Int64
	w := testnats.Connect(t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed),
		nats.CustomInboxPrefix(cd.InboxPrefix), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				refused.Add(1)
			}
		}))

	// What the rogue reads off a request the node sends it (a list, as any tenant's
	// list or the node's own rounds make one): <inbox prefix>.<nuid>.<random>.<token>.
	var mu sync.Mutex
	var prefix, gen string // the inbox prefix and the nuid generator's prefix
	var last, inc int64
	observe := func() {
		t.Helper()
		if _, _, err := n.queryWorkloads(ctx, protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace}); err != nil {
			t.Fatal(err)
		}
		for {
			m, err := seen.NextMsg(100 * time.Millisecond)
			if err != nil {
				return
			}
			tok := strings.Split(m.Reply, ".")
			if len(tok) < 4 || len(tok[len(tok)-3]) != 22 {
				t.Fatalf("reply subject %q: not an inbox, a nuid, a token and a token", m.Reply)
			}
			id := tok[len(tok)-3]
			mu.Lock()
			if gen == id[:12] {
				inc = gcd(inc, seq62(id[12:])-last)
			}
			prefix, gen, last = strings.Join(tok[:len(tok)-3], "."), id[:12], seq62(id[12:])
			mu.Unlock()
		}
	}
	for range 5 {
		observe()
	}
	mu.Lock()
	t.Logf("learnt from the node's requests: inbox prefix %s, generator %s, increment %d", prefix, gen, inc)
	if inc == 0 {
		t.Fatal("the node's nuid generator was not learnt from its requests")
	}
	mu.Unlock()

	// The forged heartbeats, onto the inboxes the node names next.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			began := time.Now()
			mu.Lock()
			p, g, s, d := prefix, gen, last, inc
			mu.Unlock()
			for k := int64(1); k <= 64; k++ {
				for _, pre := range []string{p, "_INBOX"} {
					for _, target := range targets {
						_ = w.PublishMsg(&nats.Msg{Subject: pre + "." + g + enc62(s+k*d), Header: nats.Header{
							"Status": {"100"}, "Description": {"Idle Heartbeat"},
							"Nats-Consumer-Stalled": {"$JS.API.STREAM.DELETE." + target}}})
						sent.Add(1)
					}
				}
			}
			_ = w.Flush() // the server has refused the round
			// A spray, not a flood: it rests as long as its round took (at least 1 ms), so
			// it holds the server at most half the time however slow the host, and the node
			// and new clients keep up (a 1 ms rest alone, at load 16 under -race, starved
			// a new client's CONNECT past nats.go's 2 s).
			time.Sleep(max(time.Since(began), time.Millisecond))
		}
	})
	gone := func() []string {
		var out []string
		for _, s := range targets {
			if _, err := js.Stream(ctx, s); errors.Is(err, jetstream.ErrStreamNotFound) {
				out = append(out, s)
			}
		}
		return out
	}
	// A registration opens the watcher (a rogue that exits is started again by nexd
	// and registers; here new nexlets of its type).
	var deleted []string
	registrations := 0
	for i := 0; i < 40 && len(deleted) == 0; i++ {
		registrations++
		observe()
		rf.minted(fmt.Sprintf("late%d", i), fmt.Sprintf("late%d", i), "native", nil)
		deleted = gone()
	}
	close(stop)
	wg.Wait()
	t.Logf("%d forged heartbeats sent in %d registrations, %d refused by the server", sent.Load(), registrations, refused.Load())
	testkit.WaitFor(500*time.Millisecond, func() bool { return len(gone()) > 0 })
	if deleted = gone(); len(deleted) > 0 {
		t.Errorf("the rogue nexlet had the node delete %v (its inboxes: %s.<nuid>)", deleted, prefix)
	}
	if strings.HasPrefix(nodeNC.NewInbox(), "_INBOX.") {
		t.Errorf("the node's inboxes are nats.go's default %s, which workloads may publish to", nodeNC.NewInbox())
	}
}
