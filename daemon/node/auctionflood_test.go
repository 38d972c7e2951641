package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAuctionFloodSparesOtherNamespaces: a client floods namespace "flood"'s AUCTION
// subject as fast as it can publish (hundreds of thousands a second reach the node, a
// hundred times what its workers answer), far past what the subscription holds, while
// an honest client in namespace "tenant" holds 50 auctions 40 ms apart, each waiting
// 5 s for its bid (nexctl's default wait for a first bid) and asking again (2 s each)
// up to nine times, as nexctl asks again. Every honest auction must get its bid, at the first ask unless nats.go had to
// drop auctions before the node saw their namespace, and the node must drop none of
// tenant's. Before (a micro endpoint whose callback was slower than nats.go's reader),
// nats.go dropped about half of all auctions, blind to namespace: 21-29 of 50 honest
// auctions got a bid at the first ask.
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
// 2,000 (round robin alone), p50 was 2 s at load 25, and re-asks (2 s) timed out.
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

	body, err := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "flood", Tags: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	const (
		maxFlood = 50_000_000 // bounds the flood; it stops once the honest client is done
		honest   = 50
		asks     = 10
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

	// Let the flood fill the node's intake, then auction honestly every 40 ms.
	time.Sleep(200 * time.Millisecond)
	hc := testnats.Connect(t, srv)
	hreq, err := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "honest", Tags: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	var lat []time.Duration // of the honest auctions answered at the first ask
	asked, firstMissed, lost := 0, 0, 0
	start := time.Now()
	for i := 0; i < honest && time.Since(start) < 2*time.Minute; i++ {
		if i > 0 {
			time.Sleep(40 * time.Millisecond)
		}
		asked++
		for try := range asks { // nexctl asks again when no bid came
			wait := 5 * time.Second
			if try > 0 {
				wait = 2 * time.Second
			}
			t0 := time.Now()
			m, err := hc.Request(protocol.AuctionSubject("tenant"), hreq, wait)
			if err == nil && m.Header.Get(protocol.HeaderErrorCode) == "" {
				if try == 0 {
					lat = append(lat, time.Since(t0))
				}
				break
			}
			if try == 0 {
				firstMissed++
			}
			if try == asks-1 {
				lost++
			}
		}
	}
	floodFor := time.Since(start)
	cancel()
	wg.Wait()

	drops := n.AuctionDrops()
	slices.Sort(lat)
	p50, worst := time.Duration(0), time.Duration(0)
	if len(lat) > 0 {
		p50, worst = lat[len(lat)/2], lat[len(lat)-1]
	}
	shown := any(drops)
	if len(drops) > 8 {
		shown = fmt.Sprintf("%d namespaces by name, %d under %q, tenant %d", len(drops), drops[AuctionDropsOther], AuctionDropsOther, drops["tenant"])
	}
	t.Logf("flood: %d auctions sent in %v; dropped by nats.go (blind to namespace): %d; by the node, per namespace: %v; honest: %d of %d got a bid at the first ask (p50 %v, max %v), %d not in ten",
		sent.Load(), floodFor.Round(time.Millisecond), slow.dropped(), shown, asked-firstMissed, asked,
		p50.Round(time.Millisecond), worst.Round(time.Millisecond), lost)
	if drops["tenant"] != 0 {
		t.Errorf("the node dropped %d of tenant's auctions", drops["tenant"])
	}
	warns.mu.Lock()
	if warns.ns[floodNS[0]] == 0 && warns.ns[AuctionDropsOther] == 0 || warns.ns["tenant"] != 0 {
		t.Errorf("drop warnings by namespace %v, want the flood's and not tenant's", warns.ns)
	}
	warns.mu.Unlock()
	if lost > 0 {
		t.Fatalf("%d of %d honest auctions in another namespace got no bid in ten asks during the flood", lost, asked)
	}
	// Each honest auction nats.go dropped blind costs the client its 5 s first wait:
	// under load (9-13 on this 2-core host) enough of them ran out the two minutes
	// before the 50th was asked, and the shortfall was reported as auctions that got
	// no bid. Only without such drops is it one.
	if asked != honest {
		if drops[AuctionDropsUnsorted] == 0 {
			t.Fatalf("only %d of %d honest auctions asked in two minutes, with no drop outside the flooding namespace", asked, honest)
		}
		t.Logf("only %d of %d honest auctions asked in two minutes: nats.go's blind drops cost %d first asks 5 s each", asked, honest, firstMissed)
	}
	// nats.go drops blind only when the node's process was kept off the CPU long
	// enough for its subscription's list (8,192 auctions, a bound on memory) to fill,
	// as on this shared host under load. Without such drops every honest auction is
	// answered at the first ask.
	if firstMissed > 0 && drops[AuctionDropsUnsorted] == 0 {
		t.Fatalf("%d of %d honest auctions got no bid at the first ask, with no drop outside the flooding namespace", firstMissed, honest)
	}
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
