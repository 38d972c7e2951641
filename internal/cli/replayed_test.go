package cli

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// replayBids connects a bus reader (subscribe and publish on _INBOX.>, as anyone on an
// open bus may) that sends each bid of node id it reads once more, as it is, to the
// inbox it went to: a copy that verifies (a bid's signature is in its body, over the
// auction). sent is closed after the first copy reached the server.
func replayBids(t *testing.T, op *testnats.Operator, id string) (copies *atomic.Int64, sent <-chan struct{}) {
	t.Helper()
	nc := busReader(t, op)
	copies = new(atomic.Int64)
	done := make(chan struct{})
	var once sync.Once
	if _, err := nc.Subscribe("_INBOX.>", func(m *nats.Msg) {
		var b protocol.AuctionResponse
		if json.Unmarshal(m.Data, &b) != nil || b.BidderID == "" || b.NodeID != id {
			return
		}
		if nc.PublishMsg(&nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}) == nil && nc.Flush() == nil {
			copies.Add(1)
			once.Do(func() { close(done) })
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return copies, done
}

// TestAttackReplayedBidCrowdsOutNode: busy node A (5 workloads) and idle node B sign
// their bids; a bus reader sends A's bid again within the auction, and B's bid comes
// after that copy. Before, the copy counted as the second of the two bids the ping
// promised: the auction ended without B's and the workload went to the busy A. Now
// one auction takes each bidder once: the copy is refused, the auction waits for B,
// and the idle B gets the workload.
func TestAttackReplayedBidCrowdsOutNode(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	a := newSigningFakeNode(t, op.Connect(t, "node a"), nil)
	a.load = 5
	a.start()
	copies, sent := replayBids(t, op, a.id)
	b := newSigningFakeNode(t, op.Connect(t, "node b"), nil)
	b.bidAfter = sent
	b.start()

	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--gather-stall", "5s", "--namespace", "default", "workload", "run", "--name", "web", "--", "/bin/true")...)
	t.Logf("workload run: exit %d\n%s%s", code, out, errOut)
	if copies.Load() == 0 {
		t.Fatal("the bus reader replayed no bid: the test tests nothing")
	}
	if na, nb := len(a.deployed()), len(b.deployed()); code != 0 || na != 0 || nb != 1 {
		t.Errorf("exit %d, busy node a started %d, idle node b %d: want the one start on b (a's replayed bid crowded b's out)", code, na, nb)
	}
}

// TestAttackReplayedBidDeploysTwice: of two nodes, A alone bids and refuses the deploy
// (not started); a bus reader sends A's bid again within the auction. Before, the copy
// was the "next bid" nexctl fell back to: A was sent the deploy twice and nexctl said
// "trying the next bid" of the same node. Now A is asked once.
func TestAttackReplayedBidDeploysTwice(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	a := newSigningFakeNode(t, op.Connect(t, "node a"), nil)
	a.failDeploy = "disk full"
	a.start()
	b := newSigningFakeNode(t, op.Connect(t, "node b"), nil)
	b.bid = false // answers the ping: two bids are awaited
	b.start()
	copies, _ := replayBids(t, op, a.id)

	out, errOut, code := runCLI(t, nil, opArgs(t, op, "--namespace", "default", "workload", "run", "--name", "web", "--", "/bin/true")...)
	t.Logf("workload run: exit %d\n%s%s", code, out, errOut)
	if copies.Load() == 0 {
		t.Fatal("the bus reader replayed no bid: the test tests nothing")
	}
	if n := len(a.deployed()); code == 0 || n != 1 {
		t.Errorf("exit %d, node a was sent the deploy %d times: want once, and the run failed", code, n)
	}
}

// TestAttackReplayedKeepAliveHoldsDeploy: a signing node takes a deploy, sends one
// keep-alive and is gone; a bus reader sends that keep-alive again to nexctl's inbox
// every 100 ms (it verifies: the same nonce, the same bytes). Before, each copy counted
// as the node heard from, so the deploy waited to its own bound (here 20 s) and ended
// "deploy timed out" instead of "outcome unknown" after the node's silence (2 s). Now
// a nexd node numbers its signed replies (HeaderSeq, under the signature), each number
// is taken once, and the copies are refused.
func TestAttackReplayedKeepAliveHoldsDeploy(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	a := newSigningFakeNode(t, op.Connect(t, "node a"), nil)
	a.goneAfterAlive = true
	a.start()
	reader := busReader(t, op)
	done := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(done); wg.Wait() })
	var copies atomic.Int64
	if _, err := reader.Subscribe("_INBOX.>", func(m *nats.Msg) {
		if m.Header.Get(protocol.HeaderAlive) == "" || m.Header.Get(protocol.HeaderSig) == "" {
			return
		}
		c := &nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}
		wg.Go(func() {
			for range 300 { // 30 s at most
				if reader.PublishMsg(c) == nil {
					copies.Add(1)
				}
				select {
				case <-done:
					return
				case <-time.After(100 * time.Millisecond):
				}
			}
		})
	}); err != nil {
		t.Fatal(err)
	}
	if err := reader.Flush(); err != nil {
		t.Fatal(err)
	}
	f := &fleet{nc: op.Connect(t, "nexctl"), ns: "default", first: 3 * time.Second, stall: 25 * time.Millisecond,
		deployTimeout: 20 * time.Second, deployMax: 20 * time.Second, aliveEvery: 100 * time.Millisecond, silence: 2 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	_, err := f.deploy(ctx, "bid-"+a.id, protocol.StartWorkloadRequest{Name: "w", Namespace: "default", WorkloadType: "native", WorkloadLifecycle: protocol.LifecycleService, RunRequest: `{"uri":"file:///bin/true"}`}, a.id)
	t.Logf("deploy: %v after %s, %d copies sent", err, time.Since(start).Round(time.Millisecond), copies.Load())
	if copies.Load() == 0 {
		t.Fatal("the bus reader replayed no keep-alive: the test tests nothing")
	}
	if !errors.Is(err, errOutcomeUnknown) {
		t.Errorf("deploy to a node gone after one keep-alive, its keep-alive replayed: %v; want %v at the node's silence", err, errOutcomeUnknown)
	}
}

// TestAttackReplayedKillEventsInflateDrain: a node drains two workloads, one killed at
// the end of its stop grace; anyone who may read the feeds and publish on them (a
// rogue node, anyone on an open bus) sends each WORKLOADSTOPPED event again, three
// times. Before, `lameduck --wait` counted every copy of the kill: 4 workloads killed
// on a node that held 2 (--json "killed": 4, "4 workload(s) ignored SIGTERM"); now each
// workload's kill counts once.
func TestAttackReplayedKillEventsInflateDrain(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	def := "default"
	n := newFakeNode(t, nc, "NKILLS", map[string]string{"zone": "k"})
	n.drains, n.load, n.kills = true, 2, 1
	n.workloads = []protocol.WorkloadSummary{{ID: "WK1", Name: "a", Namespace: &def, WorkloadType: "native"},
		{ID: "WK2", Name: "b", Namespace: &def, WorkloadType: "native"}}
	n.start()
	rogue := testnats.Connect(t, s)
	var copies atomic.Int64
	if _, err := rogue.Subscribe(protocol.EventSubject("*", protocol.EventWorkloadStopped), func(m *nats.Msg) {
		if m.Header.Get("Rogue-Copy") != "" {
			return // its own
		}
		for range 3 {
			if rogue.PublishMsg(&nats.Msg{Subject: m.Subject, Data: m.Data, Header: nats.Header{"Rogue-Copy": {"1"}}}) == nil {
				copies.Add(1)
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := rogue.Flush(); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "--json", "node", "lameduck", "--tag", "zone=k", "--delay", "300ms", "--wait")...)
	t.Logf("exit %d, %d copies sent\n%s\n%s", code, copies.Load(), out, errOut)
	if copies.Load() == 0 {
		t.Fatal("the rogue sent no copy: the test tests nothing")
	}
	var res []struct {
		Drained bool `json:"drained"`
		Killed  int  `json:"killed"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res) != 1 {
		t.Fatalf("json %v: %s", err, out)
	}
	if code != ExitFailed || !res[0].Drained || res[0].Killed != 1 || !strings.Contains(errOut, "1 workload(s) ignored SIGTERM") {
		t.Errorf("exit %d, %+v; want exit %d, drained, 1 killed (of the node's 2 workloads, 1 killed)", code, res[0], ExitFailed)
	}
}
