package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAuctionFloodSparesOtherNamespaces: a client floods namespace "flood"'s AUCTION
// subject as fast as it can publish (hundreds of thousands a second reach the node, a
// hundred times what its workers answer), far past what the subscription holds, while
// an honest client in namespace "tenant" holds 50 auctions 40 ms apart. The claim, in
// counts: the node drops none of tenant's auctions, answers every one it took in with
// a bid, and none of them waits behind a turn of the flooding namespace once that lost
// auctions (0 such turns); and every honest auction reaches the node unless nats.go or
// nats-server dropped auctions blind to namespace before the node saw it, the one case
// in which the client asks again, as nexctl does. Before (a micro endpoint whose
// callback was slower than nats.go's reader), nats.go dropped about half of all
// auctions, blind to namespace: 21-29 of 50 honest auctions got a bid at the first ask.
// How many bids came within nexctl's 5 s first wait is logged, not asserted: on a
// loaded 2-core machine the whole process, the server's outbound buffer in front of
// the node's connection included, is as slow as its share of the CPU (CI: one of 50
// took more than 5 s at load 40, with nothing dropped).
func TestAuctionFloodSparesOtherNamespaces(t *testing.T) {
	auctionFlood(t, []string{"flood"})
}

// TestAuctionFloodOfManyNamespacesSparesANewOne: the flood spreads over 2,000
// namespaces, more than the 1,024 the queue's namespace table held: it stayed full of
// the flood's, and every auction of a namespace not already waiting was dropped, the
// honest tenant's first among them: none of 6 honest auctions asked in two minutes got
// a bid, in ten asks. Now the queue makes room for a newcomer by dropping the oldest
// auction of the namespace holding the most, and the namespaces that lost auctions take
// their turns after the others: 48 of 50 bid at the first ask (p50 0.1 s; the other
// two were among nats.go's blind drops). Had the newcomer waited its turn behind all
// the flood's namespaces (round robin alone), p50 was 2 s at load 25, and re-asks (2 s)
// timed out; counted in turns, each honest auction then waited 240-500 turns, most of
// them of namespaces that had lost auctions, and 3 of 50 asks were answered in two
// minutes; now it waits a few dozen at most, none of them such.
func TestAuctionFloodOfManyNamespacesSparesANewOne(t *testing.T) {
	nss := make([]string, 2000)
	for i := range nss {
		nss[i] = fmt.Sprintf("flood%d", i)
	}
	auctionFlood(t, nss)
}

// auctionFlood floods the AUCTION subjects of floodNS in turn while an honest tenant
// auctions, and checks what TestAuctionFloodSparesOtherNamespaces says.
func auctionFlood(t *testing.T, floodNS []string) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	slow := &slowSubs{m: map[*nats.Subscription]bool{}}
	warns := &dropWarns{ns: map[string]int{}}
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) {
		o.NC = testnats.Connect(t, srv, nats.ErrorHandler(slow.note))
		o.Logger = slog.New(warns)
	})
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "native", "native", nil)
	// tenant's auctions as the node's queue hands them to its workers: how many, each
	// one's wait in turns (auctions served meanwhile), and how many waited behind a
	// turn of a namespace that had lost auctions.
	var (
		popped, behindLost int
		turns              []uint64
	)
	n.auctions.mu.Lock()
	n.auctions.popped = func(ns string, waited, waitedLost uint64) {
		if ns != "tenant" {
			return
		}
		popped++
		turns = append(turns, waited)
		if waitedLost > 0 {
			behindLost++
		}
	}
	n.auctions.mu.Unlock()
	// Auctions dropped before the node saw their namespace: by nats.go (its list full)
	// or by nats-server (a slow consumer's connection is closed, and the node reconnects).
	blind := func() uint64 {
		vz, err := srv.Varz(nil)
		if err != nil {
			t.Fatal(err)
		}
		return n.AuctionDrops()[AuctionDropsUnsorted] + uint64(vz.SlowConsumers) + n.o.NC.Stats().Reconnects
	}

	body, err := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "flood", Tags: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	const (
		maxFlood = 50_000_000 // bounds the flood; it stops once the honest client is done
		honest   = 50
		asks     = 10
		// askBound bounds the wait for the bid of an auction nothing was dropped blind
		// since: it comes however slow the machine (CI's worst was above 5 s), so only a
		// lost auction reaches this.
		askBound = time.Minute
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var sent atomic.Int64
	var wg sync.WaitGroup
	pc := testnats.Connect(t, srv)
	wg.Add(1)
	go func() {
		defer wg.Done()
		subj := make([]string, len(floodNS))
		for i, ns := range floodNS {
			subj[i] = protocol.AuctionSubject(ns)
		}
		for i := range maxFlood {
			if i%1024 == 0 && ctx.Err() != nil {
				return
			}
			if err := pc.PublishRequest(subj[i%len(subj)], "_INBOX.flood.x", body); err != nil {
				return
			}
			sent.Add(1)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })

	// The flood has filled the node's intake once the node drops its auctions; then
	// auction honestly every 40 ms.
	testkit.Eventually(t, "the node dropping flood auctions", func() bool { return len(n.AuctionDrops()) > 0 })
	hc := testnats.Connect(t, srv)
	hreq, err := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "honest", Tags: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	// Each ask has its own reply subject, so a bid that comes after the client asked
	// again is still counted, as the ask's.
	var (
		bmu     sync.Mutex
		bids    = map[string]int{} // by reply subject
		refused []string           // error replies
	)
	came := make(chan struct{}, 1)
	inbox := hc.NewInbox()
	if _, err := hc.Subscribe(inbox+".*", func(m *nats.Msg) {
		bmu.Lock()
		if c := m.Header.Get(protocol.HeaderErrorCode); c != "" {
			refused = append(refused, c+" "+m.Header.Get(protocol.HeaderError))
		} else {
			bids[m.Subject]++
		}
		bmu.Unlock()
		select {
		case came <- struct{}{}:
		default:
		}
	}); err != nil {
		t.Fatal(err)
	}
	bidFor := func(reply string) bool {
		bmu.Lock()
		defer bmu.Unlock()
		return bids[reply] > 0
	}
	var lat []time.Duration // of the honest auctions answered at the first ask
	asked, inTime, firstMissed, lost := 0, 0, 0, 0
	start := time.Now()
	for i := range honest {
		if i > 0 {
			time.Sleep(40 * time.Millisecond)
		}
		answered := false
		for try := 0; try < asks && !answered; try++ {
			// nexctl waits 5 s for a first bid, 2 s for a later one, then asks again:
			// here the client asks again only when an auction was dropped blind since
			// this ask, for only then may this one be lost.
			wait := 5 * time.Second
			if try > 0 {
				wait = 2 * time.Second
			}
			reply := fmt.Sprintf("%s.%d-%d", inbox, i, try)
			blindAtAsk := blind()
			t0 := time.Now()
			if err := hc.PublishRequest(protocol.AuctionSubject("tenant"), reply, hreq); err != nil {
				t.Fatal(err)
			}
			asked++
			for {
				if bidFor(reply) {
					answered = true
					if try == 0 {
						lat = append(lat, time.Since(t0))
						if time.Since(t0) < wait {
							inTime++
						}
					}
					break
				}
				if time.Since(t0) > wait && blind() != blindAtAsk {
					break // perhaps among those dropped blind: ask again
				}
				if time.Since(t0) > askBound {
					t.Fatalf("honest auction %d, ask %d: no bid in %v, and no auction was dropped blind since it was asked (tenant's auctions the node took off its queue: %d of %d asked)",
						i, try+1, askBound, poppedNow(n, &popped), asked)
				}
				select {
				case <-came:
				case <-time.After(50 * time.Millisecond):
				}
			}
			if try == 0 && !answered {
				firstMissed++
			}
		}
		if !answered {
			lost++
		}
	}
	floodFor := time.Since(start)
	cancel()
	wg.Wait()
	blindDrops := blind()
	// Every ask the node took in is answered, a re-asked one's late bid too.
	if !testkit.WaitFor(askBound, func() bool {
		bmu.Lock()
		defer bmu.Unlock()
		got := 0
		for _, c := range bids {
			got += c
		}
		return got+len(refused) >= poppedNow(n, &popped) && (blindDrops > 0 || poppedNow(n, &popped) >= asked)
	}) {
		t.Errorf("tenant's auctions: %d asked, %d taken off the node's queue, %d bids and %d refusals came (nothing dropped blind: %v)",
			asked, poppedNow(n, &popped), len(bids), len(refused), blindDrops == 0)
	}
	// The health tick's warning names the flood's drops.
	testkit.Eventually(t, "the node's warning of the flood's drops", func() bool {
		warns.mu.Lock()
		defer warns.mu.Unlock()
		return warns.ns[floodNS[0]] > 0 || warns.ns[AuctionDropsOther] > 0
	})

	drops := n.AuctionDrops()
	slices.Sort(lat)
	p50, worst := time.Duration(0), time.Duration(0)
	if len(lat) > 0 {
		p50, worst = lat[len(lat)/2], lat[len(lat)-1]
	}
	n.auctions.mu.Lock()
	tt := slices.Clone(turns)
	behind := behindLost
	n.auctions.mu.Unlock()
	slices.Sort(tt)
	tp50, tmax := uint64(0), uint64(0)
	if len(tt) > 0 {
		tp50, tmax = tt[len(tt)/2], tt[len(tt)-1]
	}
	shown := any(drops)
	if len(drops) > 8 {
		shown = fmt.Sprintf("%d namespaces by name, %d under %q, tenant %d", len(drops), drops[AuctionDropsOther], AuctionDropsOther, drops["tenant"])
	}
	t.Logf("flood: %d auctions sent in %v; dropped blind to namespace: %d (nats.go %d); by the node, per namespace: %v; honest: %d asks for %d auctions, %d answered at the first ask (%d within nexctl's 5 s; p50 %v, max %v), %d not in ten; "+
		"tenant's auctions waited p50 %d turns, max %d, %d of them behind a namespace that had lost auctions; load %s",
		sent.Load(), floodFor.Round(time.Millisecond), blindDrops, slow.dropped(), shown, asked, honest, honest-firstMissed, inTime,
		p50.Round(time.Millisecond), worst.Round(time.Millisecond), lost, tp50, tmax, behind, loadAvg())
	if drops["tenant"] != 0 {
		t.Errorf("the node dropped %d of tenant's auctions", drops["tenant"])
	}
	bmu.Lock()
	if len(refused) > 0 {
		t.Errorf("tenant's auctions refused: %v", refused)
	}
	bmu.Unlock()
	warns.mu.Lock()
	if warns.ns["tenant"] != 0 {
		t.Errorf("drop warnings by namespace %v, want the flood's and not tenant's", warns.ns)
	}
	warns.mu.Unlock()
	if behind > 0 {
		t.Errorf("%d of tenant's auctions waited behind turns of namespaces that had lost auctions (they take their turns after those that lost none)", behind)
	}
	if lost > 0 {
		t.Fatalf("%d of %d honest auctions in another namespace got no bid in ten asks during the flood", lost, honest)
	}
	// A first ask goes unanswered only when nats.go or nats-server dropped it blind.
	if firstMissed > 0 && blindDrops == 0 {
		t.Fatalf("%d of %d honest auctions got no bid at the first ask, with nothing dropped blind to namespace", firstMissed, honest)
	}
}

// poppedNow reads a count the auction queue's popped hook keeps under its lock.
func poppedNow(n *Node, c *int) int {
	n.auctions.mu.Lock()
	defer n.auctions.mu.Unlock()
	return *c
}

// loadAvg is the host's load, for the log: what the honest auctions' times depend on.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

// dropWarns is a log handler that counts the node's drop warnings by namespace.
type dropWarns struct {
	mu sync.Mutex
	ns map[string]int
}

func (w *dropWarns) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *dropWarns) WithAttrs([]slog.Attr) slog.Handler           { return w }
func (w *dropWarns) WithGroup(string) slog.Handler                { return w }
func (w *dropWarns) Handle(_ context.Context, r slog.Record) error {
	if !strings.HasPrefix(r.Message, "auctions dropped") {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "namespace" {
			w.mu.Lock()
			w.ns[a.Value.String()]++
			w.mu.Unlock()
		}
		return true
	})
	return nil
}

// slowSubs is a connection's error handler that remembers the subscriptions nats.go
// reported as slow consumers, to count what it dropped from them.
type slowSubs struct {
	mu sync.Mutex
	m  map[*nats.Subscription]bool
}

func (s *slowSubs) note(_ *nats.Conn, sub *nats.Subscription, err error) {
	if sub != nil && errors.Is(err, nats.ErrSlowConsumer) {
		s.mu.Lock()
		s.m[sub] = true
		s.mu.Unlock()
	}
}

func (s *slowSubs) dropped() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	total := 0
	for sub := range s.m {
		d, _ := sub.Dropped()
		total += d
	}
	return total
}

// intakeBatch is more than the subscription's pending bound, before (4,096) and now
// (65,536).
const intakeBatch = 100_000

// BenchmarkAuctionIntake is the node's AUCTION intake under a flood: one client
// publishes auctions in namespace "flood" in batches of intakeBatch as fast as it can,
// each batch followed by an honest auction in "tenant", which is answered only once the
// node took the batch in (it queues behind it). ns/op is per flood auction;
// nats-drops/op is the share nats.go dropped, blind to namespace, before the node's
// per-namespace queue saw it; honest-retries/op counts honest auctions asked again.
func BenchmarkAuctionIntake(b *testing.B) {
	srv := testnats.Start(b, testnats.Options{NoJetStream: true})
	slow := &slowSubs{m: map[*nats.Subscription]bool{}}
	f := newFixtureOn(b, srv, 1, func(_ int, o *Options) {
		o.NC = testnats.Connect(b, srv, nats.ErrorHandler(slow.note))
	})
	f.healthyAgent(f.nodes[0], "agent0", "native", "native", func(a *fakeAgent) { a.hbEvery = time.Second })
	body, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "flood", Tags: map[string]string{}})
	hreq, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "honest", Tags: map[string]string{}})
	pc, hc := testnats.Connect(b, srv), testnats.Connect(b, srv)
	subj := protocol.AuctionSubject("flood")
	retries := 0
	b.ResetTimer()
	for left := b.N; left > 0; {
		batch := min(left, intakeBatch)
		for range batch {
			if err := pc.PublishRequest(subj, "_INBOX.flood.x", body); err != nil {
				b.Fatal(err)
			}
		}
		left -= batch
		if err := pc.Flush(); err != nil {
			b.Fatal(err)
		}
		for try := 0; ; try++ {
			if try == 50 {
				b.Fatal("no honest bid in 50 tries")
			}
			m, err := hc.Request(protocol.AuctionSubject("tenant"), hreq, 200*time.Millisecond)
			if err == nil && m.Header.Get(protocol.HeaderErrorCode) == "" {
				break
			}
			retries++
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(slow.dropped())/float64(b.N), "nats-drops/op")
	b.ReportMetric(float64(retries)/float64(b.N), "honest-retries/op")
}

// BenchmarkAuctionCallback is the AUCTION subscription's callback alone, the work
// that must keep ahead of nats.go's reader (about 300 ns a message in a CPU profile of
// the flood test): its namespace's queue full (a flood), and in turn with draining.
func BenchmarkAuctionCallback(b *testing.B) {
	n := &Node{log: slog.New(slog.DiscardHandler), auctions: newAuctionQueue()}
	m := &nats.Msg{Subject: protocol.AuctionSubject("flood"), Reply: "_INBOX.flood.x",
		Data: []byte(`{"agent_type":"native","auction_id":"flood","tags":{}}`)}
	b.Run("full", func(b *testing.B) {
		for range auctionQueuePerNS {
			n.onAuction(m)
		}
		b.ReportAllocs()
		for b.Loop() {
			n.onAuction(m)
		}
	})
	// A flood spread over 2,000 namespaces with the queue full: before, past the
	// 1,024th namespace each was refused; now each makes room.
	b.Run("spread", func(b *testing.B) {
		q := newAuctionQueue()
		sn := &Node{log: n.log, auctions: q}
		ms := make([]*nats.Msg, 2000)
		for i := range ms {
			ms[i] = &nats.Msg{Subject: protocol.AuctionSubject(fmt.Sprintf("flood%d", i)), Reply: m.Reply, Data: m.Data}
		}
		for i := range 64 * len(ms) {
			sn.onAuction(ms[i%len(ms)])
		}
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			sn.onAuction(ms[i%len(ms)])
			i++
		}
	})
	b.Run("drained", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			n.onAuction(m)
			n.auctions.pop()
		}
	})
}
