package node

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// benchRunRequest is a typical native run_request: a path, arguments, environment.
const benchRunRequest = `{"uri":"file:///usr/local/bin/worker","argv":["--port","8080","--verbose"],"environment":{"MODE":"prod","REGION":"eu-west-1"}}`

// BenchmarkSchema compiles the native nexlet's start request schema (done once per
// registration) and validates a run_request against it (done once per deploy).
func BenchmarkSchema(b *testing.B) {
	b.Run("compile", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := compileSchema("bench", native.StartRequestSchema); err != nil {
				b.Fatal(err)
			}
		}
	})
	s, err := compileSchema("bench", native.StartRequestSchema)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("validate", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := validateRunRequest(s, benchRunRequest); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchNode is one node with one healthy fake nexlet on a real in-process server.
func benchNode(b *testing.B) (*fixture, *nats.Conn) {
	f := newFixture(b, 1, func(_ int, o *Options) {
		// Long enough that no bid expires mid-run, as in production.
		o.AuctionTTL = 10 * time.Second
	})
	f.healthyAgent(f.nodes[0], "agent0", "bench", "native", func(a *fakeAgent) { a.hbEvery = time.Second })
	return f, f.client
}

// BenchmarkAuction is one auction round trip with one bidding node: request over NATS,
// decode, tag match, pick a nexlet, reserve a bid, encode, reply.
func BenchmarkAuction(b *testing.B) {
	_, nc := benchNode(b)
	body, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "a", Tags: map[string]string{}})
	subj := protocol.AuctionSubject("system")
	b.ReportAllocs()
	for b.Loop() {
		m, err := nc.Request(subj, body, 10*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		if m.Header.Get(protocol.HeaderErrorCode) != "" {
			b.Fatalf("auction error %s", m.Data)
		}
	}
}

// BenchmarkHandleAuction is the node's own work for one auction, as an auction worker
// does it: decode, checks, the bid recorded, signed, encoded and published (to an inbox
// nobody reads). The nexlet registered the native nexlet's start request schema, which
// every bid carries (3.3 KB, most of the bid).
func BenchmarkHandleAuction(b *testing.B) {
	f := newFixture(b, 1, func(_ int, o *Options) { o.AuctionTTL = 10 * time.Second })
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "bench", "native", func(a *fakeAgent) {
		a.hbEvery = time.Second
		a.req.StartRequestSchema = native.StartRequestSchema
	})
	body, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "a", Tags: map[string]string{}})
	req := &detachedRequest{nc: n.o.NC, subject: protocol.AuctionSubject("system"), reply: "_INBOX.bench", data: body}
	b.ReportAllocs()
	for b.Loop() {
		n.handleAuction(req)
		// A deploy takes each bid, as in a placement loop: the book stays small.
		n.mu.Lock()
		n.bids.take(n.bids.order[len(n.bids.order)-1])
		n.mu.Unlock()
	}
}

// BenchmarkDeploy is the node's whole deploy path per op: auction, ADEPLOY (schema
// validation, credential minting, store, STARTWORKLOAD to the fake nexlet and its
// reply) and UNDEPLOY, so the node holds one workload at a time.
func BenchmarkDeploy(b *testing.B) {
	_, nc := benchNode(b)
	bodies := newPlaceBodies()
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		if err := bodies.placeAndStop(nc, fmt.Sprintf("w%d", i)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkDeploySigned is BenchmarkDeploy as nexctl asks: its ADEPLOY and UNDEPLOY
// carry a nonce, the node signs its answers (protocol.SignAnswer) and the client checks
// them (protocol.VerifyAnswer). The difference to BenchmarkDeploy is what signed
// answers cost a deploy.
func BenchmarkDeploySigned(b *testing.B) {
	_, nc := benchNode(b)
	bodies := newPlaceBodies()
	bodies.signed = true
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		if err := bodies.placeAndStop(nc, fmt.Sprintf("w%d", i)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkDeployParallel is BenchmarkDeploy from several clients at once: auctions
// and deploys meet on the node's lock.
func BenchmarkDeployParallel(b *testing.B) {
	_, nc := benchNode(b)
	bodies := newPlaceBodies()
	var seq atomic.Int64
	b.ReportAllocs()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := bodies.placeAndStop(nc, fmt.Sprintf("w%d", seq.Add(1))); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// placeBodies are the requests every placement sends alike, encoded once, outside the
// timed loop.
type placeBodies struct {
	auction, stop []byte
	job           bool // deploy jobs, not services
	// signed sends the deploy and the stop a nonce, as nexctl does, and checks the
	// answers' signatures.
	signed bool
}

func newPlaceBodies() placeBodies {
	auction, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: "a", Tags: map[string]string{}})
	stop, _ := json.Marshal(protocol.StopWorkloadRequest{Namespace: "system"})
	return placeBodies{auction: auction, stop: stop}
}

// placeAndStop is one auction, ADEPLOY to its bid and UNDEPLOY of the workload.
func (p placeBodies) placeAndStop(nc *nats.Conn, name string) error {
	m, err := nc.Request(protocol.AuctionSubject("system"), p.auction, 10*time.Second)
	if err != nil {
		return err
	}
	var bid protocol.AuctionResponse
	if err := json.Unmarshal(m.Data, &bid); err != nil {
		return err
	}
	sr := startReq("system", name, `{"cmd":"run"}`)
	if p.job {
		sr.WorkloadLifecycle = protocol.LifecycleJob
	}
	req, _ := json.Marshal(sr)
	m, err = p.request(nc, protocol.DeploySubject("system", bid.BidderID), req)
	if err != nil {
		return err
	}
	var started protocol.StartWorkloadResponse
	if err := json.Unmarshal(m.Data, &started); err != nil || started.ID == "" {
		return fmt.Errorf("deploy reply %q: %v", m.Data, err)
	}
	m, err = p.request(nc, protocol.UndeploySubject("system", started.ID), p.stop)
	if err != nil {
		return err
	}
	var stopped protocol.StopWorkloadResponse
	if err := json.Unmarshal(m.Data, &stopped); err != nil || !stopped.Stopped {
		return fmt.Errorf("undeploy reply %q: %v", m.Data, err)
	}
	return nil
}

// request is one request; signed, with a nonce, its answer's signature checked.
func (p placeBodies) request(nc *nats.Conn, subject string, body []byte) (*nats.Msg, error) {
	if !p.signed {
		return nc.Request(subject, body, 10*time.Second)
	}
	nonce := randid.New()
	m, err := nc.RequestMsg(&nats.Msg{Subject: subject, Data: body, Header: nats.Header{protocol.HeaderNonce: {nonce}}}, 10*time.Second)
	if err != nil {
		return nil, err
	}
	if _, err := protocol.VerifyAnswer(nonce, subject, m.Header, m.Data); err != nil {
		return nil, err
	}
	return m, nil
}

// BenchmarkList is one WPING in the system namespace answered by a node whose nexlets
// (fake, on the same server) hold 10 workloads each: the node's fan-out to them, their
// answers, the merge and the reply.
func BenchmarkList(b *testing.B) {
	for _, nexlets := range []int{1, 3} {
		b.Run(fmt.Sprintf("nexlets=%d", nexlets), func(b *testing.B) {
			f, _ := listNode(b, nexlets)
			body, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: "system", Filter: []string{}})
			subj := protocol.WPingSubject("system")
			b.ReportAllocs()
			for b.Loop() {
				m, err := f.client.Request(subj, body, 10*time.Second)
				if err != nil {
					b.Fatal(err)
				}
				if m.Header.Get(protocol.HeaderPartial) != "" || m.Header.Get(protocol.HeaderErrorCode) != "" {
					b.Fatalf("list: %v %s", m.Header, m.Data)
				}
			}
		})
	}
}

// BenchmarkFanout is the node's QUERYWORKLOADS fan-out alone, to nexlets holding 10
// workloads each: askNexlets (each nexlet asked on its own subject with its own reply
// subject) against gather (one request on the shared subject, replies counted), the
// fan-out the list used before a reply's subject named its sender.
func BenchmarkFanout(b *testing.B) {
	for _, nexlets := range []int{1, 3} {
		_, n := listNode(b, nexlets)
		body, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: "system", Filter: []string{}})
		b.Run(fmt.Sprintf("askNexlets/nexlets=%d", nexlets), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				got := 0
				if _, err := n.askNexlets(b.Context(), protocol.QueryWorkloadsSubject(n.id), func(id string) string {
					return protocol.QueryWorkloadsAgentSubject(n.id, id)
				}, body, 10*time.Second, func(*nats.Msg, *registration) bool { got++; return true }); err != nil || got != nexlets {
					b.Fatalf("%d replies: %v", got, err)
				}
			}
		})
		b.Run(fmt.Sprintf("gather/nexlets=%d", nexlets), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				got := 0
				if err := gather(b.Context(), n.o.NC, protocol.QueryWorkloadsSubject(n.id), body, nexlets, 10*time.Second,
					func(*nats.Msg) bool { got++; return true }); err != nil || got != nexlets {
					b.Fatalf("%d replies: %v", got, err)
				}
			}
		})
	}
}

// listNode is one node with nexlets fake nexlets that hold 10 workloads each.
func listNode(b *testing.B, nexlets int) (*fixture, *Node) {
	f := newFixture(b, 1, nil)
	n := f.nodes[0]
	for i := range nexlets {
		a := f.healthyAgent(n, fmt.Sprintf("agent%d", i), fmt.Sprintf("bench%d", i), "native", func(a *fakeAgent) { a.hbEvery = time.Second })
		a.mu.Lock()
		for w := range 10 {
			a.workloads[fmt.Sprintf("a%dw%d", i, w)] = startReq("tenant", fmt.Sprintf("w%d", w), `{"cmd":"run"}`)
		}
		a.mu.Unlock()
	}
	return f, n
}

// BenchmarkAuctionNotBid is the node's decision on an auction it does not bid on (taken
// off the queue: tags that do not match, a type it has no nexlet of), without NATS:
// what such an auction costs besides its delivery, its count included.
// fitsOf is a testMinter that answers WorkloadNamespaceFits as m does.
type fitsOf struct {
	testMinter
	m *mint.SigningKeyMinter
}

func (f fitsOf) WorkloadNamespaceFits(ns string) bool { return f.m.WorkloadNamespaceFits(ns) }

func BenchmarkAuctionNotBid(b *testing.B) {
	f, _ := benchNode(b)
	// A node whose workloads' credentials in a 64-character namespace would not fit the
	// control line (a 64-character nats.jsdomain).
	acct, _ := nkeys.CreateAccount()
	seed, _ := acct.Seed()
	pub, _ := acct.PublicKey()
	m, err := mint.NewSigningKeyMinter(string(seed), pub, mint.Options{JSDomain: strings.Repeat("d", 64)})
	if err != nil {
		b.Fatal(err)
	}
	long := newFixture(b, 1, func(_ int, o *Options) {
		// The fixture's connections carry no credentials: only the bound is m's.
		o.Minter = fitsOf{o.Minter.(testMinter), m}
	})
	long.healthyAgent(long.nodes[0], "agent0", "bench", "native", func(a *fakeAgent) { a.hbEvery = time.Second })
	for _, c := range []struct {
		name string
		n    *Node
		ns   string
		req  protocol.AuctionRequest
	}{
		{"tags", f.nodes[0], "tenant", protocol.AuctionRequest{AgentType: "native", AuctionID: "a", Tags: map[string]string{"zone": "elsewhere"}}},
		{"no_nexlet", f.nodes[0], "tenant", protocol.AuctionRequest{AgentType: "wasm", AuctionID: "a", Tags: map[string]string{}}},
		{"credentials", long.nodes[0], strings.Repeat("n", protocol.MaxNamespaceLen), protocol.AuctionRequest{AgentType: "native", AuctionID: "a", Tags: map[string]string{}}},
	} {
		b.Run(c.name, func(b *testing.B) {
			if _, _, ok := c.n.bidLocked(nil, c.ns, c.req, time.Now()); ok { // and the minter's first look
				b.Fatal("bid")
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, _, ok := c.n.bidLocked(nil, c.ns, c.req, time.Now()); ok {
					b.Fatal("bid")
				}
			}
		})
	}
}

// BenchmarkDeployJobKV is BenchmarkDeploy with jobs, on a real JetStream bucket (the
// node's state store in production): "marked", to a nexlet that names its memory of
// starts, so that every answered job's record is marked started after the reply (a read
// and a conditional write of the record, off the reply's path); "unmarked", to one that
// names none, as before the mark. The difference is what the mark costs a client.
func BenchmarkDeployJobKV(b *testing.B) {
	for _, memory := range []string{"", "m1"} {
		name := "unmarked"
		if memory != "" {
			name = "marked"
		}
		b.Run(name, func(b *testing.B) {
			srv := testnats.Start(b, testnats.Options{})
			f := newFixtureOn(b, srv, 1, func(_ int, o *Options) {
				o.AuctionTTL = 10 * time.Second
				kv, err := state.OpenKV(b.Context(), testnats.Connect(b, srv), "BENCH", "", nil)
				if err != nil {
					b.Fatal(err)
				}
				o.Store = kv
			})
			f.healthyAgent(f.nodes[0], "agent0", "bench", "native", func(a *fakeAgent) {
				a.hbEvery = time.Second
				a.req.Memory = memory
			})
			bodies := newPlaceBodies()
			bodies.job = true
			i := 0
			b.ReportAllocs()
			for b.Loop() {
				if err := bodies.placeAndStop(f.client, fmt.Sprintf("w%d", i)); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}
