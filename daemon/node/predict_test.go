package node

import (
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/protocol"
)

// TestAttackWorkloadForgesStartAnswer: a workload may publish to _INBOX.> (to answer
// requests), and the ids the node hands out (workload ids, bidder ids, a reply's
// error_id) came from the same nuid generator as the names of its own reply inboxes:
// one prefix, a fixed increment. Tenant-a learns the generator from the error_ids of
// a few bad requests, and its workload sprays forged answers onto the inboxes the node
// would name next; tenant-b's deploy on a nexlet that takes a few seconds to start
// then got tenant-a's forged refusal while the nexlet started the workload. Ids are
// random now and the node's inboxes end in a random token: the deploy is answered by
// its nexlet.
func TestAttackWorkloadForgesStartAnswer(t *testing.T) {
	rf := newRogueFixture(t)
	rf.minted("slow1", "slow", "native", func(a *fakeAgent) { a.startDelay = 4 * time.Second })
	waitHealthy(t, rf.nodes[0], "slow1")
	tenantA := rf.tenant("tenant-a").nc
	cd, err := rf.m.MintWorkload("tenant-a", nuid.Next())
	if err != nil {
		t.Fatal(err)
	}
	w := rf.dial(cd)

	// The node's generator as tenant-a sees it: the bidder ids of its auctions.
	errorID := func() string {
		t.Helper()
		body, _ := json.Marshal(protocol.AuctionRequest{AuctionID: "a", AgentType: "native", Tags: map[string]string{}})
		m, err := tenantA.Request(protocol.AuctionSubject("tenant-a"), body, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var bid protocol.AuctionResponse
		if json.Unmarshal(m.Data, &bid) != nil || len(bid.BidderID) != 22 {
			t.Fatalf("no bidder id in %q", m.Data)
		}
		return bid.BidderID
	}
	// What the attacker knows of the node's nuid generator: what tenant-a's bidder ids
	// tell (before: all of it). If they tell nothing, it gets the generator itself, as
	// a nexlet that saw one of the node's reply inboxes has it (here the test's own
	// process: its nuid.Next is the node's).
	oracle := errorID
	pre, inc := learn(oracle)
	if inc == 0 {
		oracle = nuid.Next
		pre, inc = learn(oracle)
	}
	t.Logf("generator as learnt: prefix %s, increment %d", pre, inc)
	if inc == 0 {
		t.Fatal("the node's nuid generator was not learnt")
	}
	bids := rf.auction("tenant-b", protocol.AuctionRequest{AgentType: "native"}, 1)
	if len(bids) != 1 {
		t.Fatalf("bids: %v", bids)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	{
		wg.Go(func() {
			forged := nats.Header{"Nats-Service-Error-Code": {"500"}, "Nats-Service-Error": {"forged by tenant-a"}}
			for {
				select {
				case <-stop:
					return
				default:
				}
				id := oracle()
				now := seq62(id[12:])
				for k := int64(-300); k <= 300; k++ {
					_ = w.PublishMsg(&nats.Msg{Subject: "_INBOX." + id[:12] + enc62(now+k*inc), Header: forged, Data: []byte(`{"error":"forged by tenant-a"}`)})
				}
				_ = w.Flush()
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
	// The nexlet answers 4 s in; the node itself waits a minute (StartTimeout).
	m, err := rf.client.Request(protocol.DeploySubject("tenant-b", bids[0].BidderID),
		mustJSON(t, startReq("tenant-b", "victim", `{"cmd":"x"}`)), time.Minute)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("tenant-b's deploy on the nexlet that starts in 4 s: %v", err)
	}
	var started protocol.StartWorkloadResponse
	if strings.Contains(string(m.Data), "forged") || m.Header.Get("Nats-Service-Error") != "" || protocol.Decode(m.Data, &started) != nil || started.ID == "" {
		t.Errorf("tenant-b's deploy was answered %q (%v), want its nexlet's start", m.Data, m.Header)
	}
}

const digits62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

func seq62(s string) int64 {
	var v int64
	for _, c := range s {
		v = v*62 + int64(strings.IndexRune(digits62, c))
	}
	return v
}

func enc62(v int64) string {
	var b [10]byte
	for i := len(b) - 1; i >= 0; i-- {
		b[i] = digits62[v%62]
		v /= 62
	}
	return string(b[:])
}

func gcd(a, b int64) int64 {
	if a < 0 {
		a = -a
	}
	if b < 0 {
		b = -b
	}
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// learn finds the prefix and increment of the nuid generator next draws from: a
// shared prefix, and the gcd of the steps between draws (multiples of the increment);
// 0 when the draws share no prefix (not one generator's).
func learn(next func() string) (pre string, inc int64) {
	first := next()
	pre, seq0 := first[:12], seq62(first[12:])
	for range 6 {
		id := next()
		if id[:12] != pre {
			return pre, 0
		}
		inc = gcd(inc, seq62(id[12:])-seq0)
	}
	return pre, inc
}
