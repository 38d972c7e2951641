package cli

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// startDrainingNode runs a real node with key kp on its own connection to url (quick
// reconnects); at the end of its lame duck delay it calls drain with the node and its
// connection, on a goroutine the test waits for (as nexd: drain, then stop).
func startDrainingNode(t *testing.T, url string, kp nkeys.KeyPair, drain func(n *node.Node, nc *nats.Conn)) *node.Node {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	var n atomic.Pointer[node.Node] // set before any lame duck
	n.Store(startRealNode(t, url, node.Options{NC: nc, NodeKey: kp, Name: "lab",
		OnLameduck: func(delay time.Duration) {
			wg.Go(func() {
				time.Sleep(delay)
				drain(n.Load(), nc)
			})
		}}))
	return n.Load()
}

// stopNode stops n and closes its connection, as nexd does after its drain.
func stopNode(n *node.Node, nc *nats.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	_ = n.Stop(ctx)
	nc.Close()
}

// TestLameduckWaitOutcomeAcrossOutage (fault): the NATS server goes away as the node's
// lame duck delay ends and comes back 4 s later, while the node drains and tells its
// outcome, then stops. Before, the node sent the outcome once (into its connection's
// reconnect buffer), gave up flushing it after 2 s and stopped: `node lameduck --wait`
// reported it not known to be drained, exit 1. Now the node sends it again every
// second until nexctl acknowledges it (HeaderDrainAck) or protocol.DrainTellFor passed,
// and nexctl waits that long for a node gone quiet: drained, exit 0.
func TestLameduckWaitOutcomeAcrossOutage(t *testing.T) {
	t.Parallel()
	port := testkit.StablePort(t)
	at := func(o *server.Options) { o.Port = port }
	s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: at})
	url := s.ClientURL()
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	back := make(chan struct{})
	var told time.Time
	n := startDrainingNode(t, url, kp, func(n *node.Node, nc *nats.Conn) {
		s.Shutdown()
		s.WaitForShutdown()
		go func() {
			defer close(back)
			time.Sleep(4 * time.Second)
			testnats.Start(t, testnats.Options{NoJetStream: true, Configure: at})
		}()
		_, _ = n.DrainWorkloads(context.Background())
		told = time.Now()
		stopNode(n, nc)
	})
	id := n.ID()
	out, errOut, code := runCLI(t, nil, natsArgs(url, "--json", "node", "lameduck", id, "--delay", "300ms", "--wait")...)
	<-back
	var res struct {
		Drained bool   `json:"drained"`
		Outcome string `json:"outcome"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || !res.Drained || res.Outcome != protocol.DrainDrained {
		t.Fatalf("lameduck --wait across a 4 s outage at the drain's end: exit %d (told %v)\nstdout: %s\nstderr: %s", code, !told.IsZero(), out, errOut)
	}
}

// TestLameduckWaitReplayedDrainOutcome (attack): a node's genuine signed "drained",
// recorded from an earlier drain (another client's nonce), is replayed to the
// `node lameduck --wait` of the node's next run, as it is and with its nonce changed to
// this client's, by a client that sees the LAMEDUCK request; that run then dies
// mid-drain without a word. nexctl believes neither: not known to be drained, exit 1,
// and a warning that it ignored them. The re-sending of outcomes leaves this as it was:
// each is signed over its client's nonce.
func TestLameduckWaitReplayedDrainOutcome(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	url := s.ClientURL()
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	first := startDrainingNode(t, url, kp, func(n *node.Node, nc *nats.Conn) {
		_, _ = n.DrainWorkloads(context.Background())
		stopNode(n, nc)
	})
	id := first.ID()

	// The earlier drain's outcome, as its client (or anyone reading its inbox) got it.
	nc := testnats.Connect(t, s)
	inbox := nc.NewInbox()
	outcomes, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(protocol.LameduckRequest{Delay: "100ms"})
	if err := nc.PublishMsg(&nats.Msg{Subject: protocol.LameduckSubject(id), Reply: inbox, Data: req,
		Header: nats.Header{protocol.HeaderDrainWait: {"earlier"}}}); err != nil {
		t.Fatal(err)
	}
	var recorded *nats.Msg
	for recorded == nil {
		m, err := outcomes.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("the earlier drain's outcome: %v", err)
		}
		var r protocol.LameduckResponse
		if json.Unmarshal(m.Data, &r) == nil && r.Drain != nil && r.Drain.State == protocol.DrainDrained {
			recorded = m
		}
	}
	testkit.Eventually(t, "the node's first run gone", func() bool {
		_, err := nc.Request(protocol.InfoSubject(id), []byte("{}"), time.Second)
		return err != nil
	})

	// The next run, with the same key, dies mid-drain (its connection cut, no word).
	startDrainingNode(t, url, kp, func(_ *node.Node, nc *nats.Conn) { nc.Close() })
	replayed := make(chan int, 1)
	if _, err := nc.Subscribe(protocol.LameduckSubject(id), func(m *nats.Msg) {
		nonce := m.Header.Get(protocol.HeaderDrainWait)
		if nonce == "" || m.Reply == "" {
			return
		}
		time.Sleep(100 * time.Millisecond) // after the node's promise
		_ = nc.Publish(m.Reply, recorded.Data)
		var r protocol.LameduckResponse
		_ = json.Unmarshal(recorded.Data, &r)
		r.Drain.Nonce = nonce
		b, _ := json.Marshal(r)
		_ = nc.Publish(m.Reply, b)
		replayed <- 2
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := runCLI(t, nil, natsArgs(url, "node", "lameduck", id, "--delay", "300ms", "--wait")...)
	select {
	case <-replayed:
	default:
		t.Fatal("the attacker never saw the LAMEDUCK request")
	}
	if code != 1 || strings.Contains(out, "drained (") || !strings.Contains(out, "not known to be drained") ||
		!strings.Contains(errOut, "ignored 2 drain outcome(s)") {
		t.Fatalf("lameduck --wait with replayed outcomes: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}
