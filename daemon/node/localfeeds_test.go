package node

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// withChannel is signedStart plus a local channel for that start, as the nexlets
// manager makes one for the native nexlet: its registration, signed with the start's
// key, gets the channel. s receives the nexlet's end, serving (acknowledgements to acks).
func withChannel(t *testing.T, n *Node, s **localchan.Server, acks chan error) func(*fakeAgent) {
	return func(a *fakeAgent) {
		signedStart(n, true)(a)
		pub, _ := a.key.PublicKey()
		_, *s = localPair(t, n, a.id, pub)
		serveAcks(t, *s, acks)
	}
}

// serveAcks reads s's acknowledgements into acks.
func serveAcks(t *testing.T, s *localchan.Server, acks chan error) {
	s.OnFeedAck = func(_ uint64, err error) { acks <- err }
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(func(*localchan.Request) {}) }()
	t.Cleanup(func() { _ = s.StopServing(); <-done })
}

// sendFeeds sends batch on s and waits for the node's acknowledgement.
func sendFeeds(t *testing.T, s *localchan.Server, acks chan error, id uint64, batch ...*nats.Msg) {
	t.Helper()
	if err := s.SendFeeds(id, batch); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-acks:
		if err != nil {
			t.Fatalf("feed batch refused: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("feed batch not acknowledged")
	}
}

func feedMsg(subj, data string) *nats.Msg {
	m := nats.NewMsg(subj)
	m.Header.Set("synadia.com-namespace", "tenant")
	m.Data = []byte(data)
	return m
}

// TestRogueNexletForgesFeedsOnLocalChannel: a native nexlet's local channel carries
// its feeds to the node, which passes on only its own workloads', as the relay does. A
// rogue nexlet whose registration holds a channel sends on it a line and an event of
// another nexlet's workload (dropped) and a line of its own (passed, headers and all);
// a channel of a start that never registered, and one handed to the victim's agent id
// for a start whose key the victim's registration was not signed with (a stale one),
// carry nothing, not even the victim's own workload's lines.
func TestRogueNexletForgesFeedsOnLocalChannel(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	rf.minted("agent0", "native-nexlet", "native", signedStart(n, true))
	var rogueEnd *localchan.Server
	acks := make(chan error, 4)
	rf.minted("rogue0", "rogue", "rogue", withChannel(t, n, &rogueEnd, acks))
	victimWID := rf.deployOne("tenant")
	own := rf.deployOnRogue()
	feed := rf.tenantFeed()
	victimLog := protocol.LogSubject("tenant", victimWID, "stdout")
	started := protocol.EventSubject("tenant", protocol.EventWorkloadStarted)
	sendFeeds(t, rogueEnd, acks, 1,
		feedMsg(victimLog, "forged on its channel"),
		feedMsg(started, fmt.Sprintf(`{"id":%q,"namespace":"tenant"}`, victimWID)),
		feedMsg(protocol.LogSubject("other", own, "stdout"), "own line, another namespace"),
		feedMsg(protocol.FeedRelaySubject(n.ID(), "rogue0", protocol.LogSubject("tenant", own, "stdout")), "not a feed subject"),
		feedMsg(protocol.LogSubject("tenant", own, "stdout"), "honest"))

	ghostAcks := make(chan error, 4)
	_, pub := newKey(t)
	n.ExpectAgent("ghost0", "ghost")
	_, ghost := localPair(t, n, "ghost0", pub)
	serveAcks(t, ghost, ghostAcks)
	sendFeeds(t, ghost, ghostAcks, 1, feedMsg(victimLog, "forged by a start that never registered"))

	staleAcks := make(chan error, 4)
	_, stalePub := newKey(t)
	_, stale := localPair(t, n, "agent0", stalePub)
	serveAcks(t, stale, staleAcks)
	sendFeeds(t, stale, staleAcks, 1, feedMsg(victimLog, "forged on a channel the victim's registration does not hold"))

	var got []string
	for _, m := range feedMsgs(feed) {
		got = append(got, m.Subject+" "+string(m.Data))
		if m.Header.Get("synadia.com-namespace") != "tenant" {
			t.Errorf("the line from the channel lost its headers: %v", m.Header)
		}
	}
	want := []string{protocol.LogSubject("tenant", own, "stdout") + " honest"}
	if !slices.Equal(got, want) {
		t.Errorf("the tenant's feeds carried %q, want only %q", got, want)
	}
}

// TestLocalFeedBatchOutlivesUnpublishableMessage: a batch on the native nexlet's pair
// holds, between two lines of its workload, one the NATS server cannot take (larger
// than its max_payload). The node drops it, and the batch is acknowledged, so the
// lines after it pass. Before, the publish
// error refused the whole batch, which the nexlet sends again every 250 ms with all
// after it: that nexlet's feeds stopped for every workload until its buffer overflowed.
func TestLocalFeedBatchOutlivesUnpublishableMessage(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	var end *localchan.Server
	acks := make(chan error, 4)
	rf.minted("rogue0", "rogue", "rogue", withChannel(t, n, &end, acks))
	own := rf.deployOnRogue()
	feed := rf.tenantFeed()
	subj := protocol.LogSubject("tenant", own, "stdout")
	huge := strings.Repeat("x", int(rf.client.MaxPayload())+1)
	// As the nexlet batches them: a message over localchan.MaxFeedBatch goes alone.
	sendFeeds(t, end, acks, 1, feedMsg(subj, "before"))
	sendFeeds(t, end, acks, 2, feedMsg(subj, huge))
	sendFeeds(t, end, acks, 3, feedMsg(subj, "after"))
	var got []string
	for _, m := range feedMsgs(feed) {
		if len(m.Data) > 16 {
			t.Errorf("a line of %d bytes reached the feed", len(m.Data))
			continue
		}
		got = append(got, string(m.Data))
	}
	if want := []string{"before", "after"}; !slices.Equal(got, want) {
		t.Errorf("the tenant's feed carried %q, want %q", got, want)
	}
}

// TestLocalFeedStopSurvivesFailedFlush: the native nexlet's batch carrying its
// workload's WORKLOADSTOPPED reaches a node whose link to the NATS server loses what
// it sends (a proxy drops the node's bytes): the publish goes nowhere and the flush
// fails, so the batch is refused; the link is cut, the node reconnects, and the nexlet
// sends the batch again. The tenant gets the event once. Before, the node counted the
// event as published at the first try and dropped the re-sent one as a duplicate (and
// would have skipped the ended report's too): the tenant never heard of the end.
func TestLocalFeedStopSurvivesFailedFlush(t *testing.T) {
	f := newStopOnPair(t)
	bp, reconnected, end, acks, stops, stopped := f.bp, f.reconnected, f.end, f.acks, f.stops, f.stopped

	bp.drop(true)
	if err := end.SendFeeds(1, []*nats.Msg{stopped}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-acks:
		if err == nil {
			t.Fatal("the batch was acknowledged though its flush had nowhere to go")
		}
		t.Logf("first batch refused: %v", err)
	case <-time.After(3 * localFeedFlushWait):
		t.Fatal("feed batch not answered")
	}
	bp.cut()
	select {
	case <-reconnected:
	case <-time.After(10 * time.Second):
		t.Fatal("the node did not reconnect")
	}
	sendFeeds(t, end, acks, localchan.FeedRefused(1, 1)+1, stopped) // numbered as the nexlet does after a refusal
	if got := feedBodies(stops); len(got) != 1 {
		t.Errorf("the tenant got %d WORKLOADSTOPPED events for its workload, want 1: %q", len(got), got)
	}
}

// TestLocalFeedBatchLostToReconnectIsRefused: a batch carrying the workload's
// WORKLOADSTOPPED is published on a NATS connection that then dies with it (a proxy
// drops the node's bytes, then cuts the connection); the node reconnects and only then
// flushes. The flush's PING and PONG go over the new connection and succeed, but the
// batch never reached the server: the flush must refuse the batch, so that the nexlet
// sends it again. Before, the batch was acknowledged and lost, and its stop event
// with it.
func TestLocalFeedBatchLostToReconnectIsRefused(t *testing.T) {
	f := newStopOnPair(t)
	n, bp, reconnected, stops, stopped := f.rf.nodes[0], f.bp, f.reconnected, f.stops, f.stopped
	n.mu.Lock()
	c := n.agents["rogue0"].local
	n.mu.Unlock()
	take, flush := n.localFeeds("rogue0", c)

	bp.drop(true)
	if err := take([]*nats.Msg{stopped}); err != nil {
		t.Fatalf("take: %v", err)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the batch's bytes went into the dropping proxy", func() bool { return bp.dropped.Load() > 0 })
	bp.cut()
	select {
	case <-reconnected:
	case <-time.After(10 * time.Second):
		t.Fatal("the node did not reconnect")
	}
	if err := flush(context.Background()); err == nil {
		t.Error("the flush after a reconnect acknowledged a batch the dead connection lost")
	} else {
		t.Logf("flush: %v", err)
		if err := take([]*nats.Msg{stopped}); err != nil { // the nexlet's re-send
			t.Fatalf("take again: %v", err)
		}
		if err := flush(context.Background()); err != nil {
			t.Fatalf("flush again: %v", err)
		}
	}
	if got := feedBodies(stops); len(got) != 1 {
		t.Errorf("the tenant got %d WORKLOADSTOPPED events for its workload, want 1: %q", len(got), got)
	}
}

// stopOnPair is a proxied rogue fixture whose rogue nexlet holds a local channel (end,
// acknowledgements to acks) and runs a workload in tenant; stopped is that workload's
// WORKLOADSTOPPED, and stops a tenant client's subscription to such events.
type stopOnPair struct {
	rf          *rogueFixture
	bp          *blackholeProxy
	reconnected chan struct{}
	end         *localchan.Server
	acks        chan error
	stops       *nats.Subscription
	stopped     *nats.Msg
}

func newStopOnPair(t *testing.T) *stopOnPair {
	f := &stopOnPair{acks: make(chan error, 4)}
	f.rf, f.bp, f.reconnected = newProxiedRogueFixture(t)
	f.rf.minted("rogue0", "rogue", "rogue", withChannel(t, f.rf.nodes[0], &f.end, f.acks))
	own := f.rf.deployOnRogue()
	f.stops = f.rf.subscribeStops()
	f.stopped = feedMsg(protocol.EventSubject("tenant", protocol.EventWorkloadStopped), fmt.Sprintf(`{"id":%q,"namespace":"tenant"}`, own))
	return f
}

// newProxiedRogueFixture is newRogueFixture whose node reaches the NATS server through
// a blackholeProxy, reconnecting at once; reconnected gets a value at each reconnect.
func newProxiedRogueFixture(t *testing.T) (rf *rogueFixture, bp *blackholeProxy, reconnected chan struct{}) {
	reconnected = make(chan struct{}, 1)
	rf = newRogueFixture(t, func(o *Options) {
		bp = startBlackholeProxy(t, o.NC.ConnectedAddr())
		opts := o.NC.Opts // the node's user, through the proxy
		opts.Url, opts.Servers = "nats://"+bp.addr(), nil
		opts.AllowReconnect, opts.MaxReconnect, opts.ReconnectWait, opts.ReconnectJitter = true, -1, 20*time.Millisecond, 0
		opts.ReconnectedCB = func(*nats.Conn) {
			select {
			case reconnected <- struct{}{}:
			default:
			}
		}
		nc, err := opts.Connect()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		o.NC = nc
	})
	return rf, bp, reconnected
}

// subscribeStops subscribes the client to namespace tenant's WORKLOADSTOPPED events.
func (rf *rogueFixture) subscribeStops() *nats.Subscription {
	rf.t.Helper()
	sub, err := rf.client.SubscribeSync(protocol.EventSubject("tenant", protocol.EventWorkloadStopped))
	if err != nil {
		rf.t.Fatal(err)
	}
	if err := rf.client.Flush(); err != nil {
		rf.t.Fatal(err)
	}
	return sub
}

// blackholeProxy forwards TCP connections to a NATS server; while dropping, it
// discards what clients send (the server never sees it, the client's socket takes it).
type blackholeProxy struct {
	ln       net.Listener
	dropping atomic.Bool
	dropped  atomic.Int64 // bytes discarded
	mu       sync.Mutex
	conns    []net.Conn
	wg       sync.WaitGroup
}

func startBlackholeProxy(t *testing.T, target string) *blackholeProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackholeProxy{ln: ln}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, s)
			p.mu.Unlock()
			p.wg.Add(2)
			go func() { defer p.wg.Done(); p.pipe(s, c, true) }()
			go func() { defer p.wg.Done(); p.pipe(c, s, false) }()
		}
	}()
	t.Cleanup(func() { ln.Close(); p.cut(); p.wg.Wait() })
	return p
}

func (p *blackholeProxy) addr() string { return p.ln.Addr().String() }

func (p *blackholeProxy) drop(on bool) { p.dropping.Store(on) }

// cut closes every connection and stops dropping: clients reconnect afresh.
func (p *blackholeProxy) cut() {
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.dropping.Store(false)
	p.mu.Unlock()
}

func (p *blackholeProxy) pipe(dst, src net.Conn, fromClient bool) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		k, err := src.Read(buf)
		if k > 0 && fromClient && p.dropping.Load() {
			p.dropped.Add(int64(k))
			k = 0
		}
		if k > 0 {
			if _, werr := dst.Write(buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestRogueNexletForgesFeedHeaders: a rogue nexlet sends a line, a metrics sample and
// an event of its own workload (namespace tenant), on its socket pair and through the
// relay, with forged headers: upstream's namespace header naming another namespace
// (twice; and in upstream's spelling with '/', on the pair), a group that is no name, JetStream's
// rollup header and a dropped count that is no number. Each arrives with the checked
// namespace alone, an empty group, and none of the rest; an honest dropped count
// passes. Before, the headers were published as the nexlet set them: the tenant's
// subscribers (and a log stream keyed on the header) read the line as another
// namespace's.
func TestRogueNexletForgesFeedHeaders(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	var end *localchan.Server
	acks := make(chan error, 4)
	rogue := rf.minted("rogue0", "rogue", "rogue", withChannel(t, n, &end, acks))
	own := rf.deployOnRogue()
	feed := rf.tenantFeed()
	forged := func(subj, data string) *nats.Msg {
		m := nats.NewMsg(subj)
		m.Header["synadia.com-namespace"] = []string{"victim", "victim"}
		m.Header["synadia.com-group"] = []string{"victim group"}
		m.Header["Nats-Rollup"] = []string{"all"}
		m.Header[protocol.HeaderFeedDropped] = []string{"lots"}
		m.Data = []byte(data)
		return m
	}
	logSubj := protocol.LogSubject("tenant", own, "stdout")
	event := fmt.Sprintf(`{"id":%q,"namespace":"tenant"}`, own)
	sendFeeds(t, end, acks, 1,
		forged(logSubj, "pair line"),
		forged(protocol.MetricsSubject("tenant", own), "pair metrics"),
		forged(protocol.EventSubject("tenant", protocol.EventWorkloadStarted), event))
	honest := feedMsg(logSubj, "pair counted")
	honest.Header.Set(protocol.HeaderFeedDropped, "3")
	sendFeeds(t, end, acks, 2, honest)
	// Upstream's spelling, which nats.go refuses in a key it publishes: before, the
	// batch was refused at every re-send.
	slash := forged(logSubj, "pair slash")
	slash.Header["synadia.com/namespace"] = []string{"victim"}
	if err := end.SendFeeds(3, []*nats.Msg{slash}); err != nil {
		t.Fatal(err)
	}
	if err := <-acks; err != nil {
		t.Errorf("the batch with upstream's spelling was refused: %v", err)
	}
	relay := forged(protocol.FeedRelaySubject(n.ID(), rogue.id, logSubj), "relay line")
	if err := rogue.nc.PublishMsg(relay); err != nil {
		t.Fatal(err)
	}
	_ = rogue.nc.Flush()

	got := map[string]nats.Header{}
	for _, m := range feedMsgs(feed) {
		got[string(m.Data)] = m.Header
	}
	for _, c := range []struct {
		data string
		want nats.Header
	}{
		{"pair line", nats.Header{"synadia.com-namespace": {"tenant"}, "synadia.com-group": {""}}},
		{"pair metrics", nats.Header{"synadia.com-namespace": {"tenant"}, "synadia.com-group": {""}}},
		{event, nil},
		{"pair counted", nats.Header{"synadia.com-namespace": {"tenant"}, "synadia.com-group": {""}, protocol.HeaderFeedDropped: {"3"}}},
		{"pair slash", nats.Header{"synadia.com-namespace": {"tenant"}, "synadia.com-group": {""}}},
		{"relay line", nats.Header{"synadia.com-namespace": {"tenant"}, "synadia.com-group": {""}}},
	} {
		h, ok := got[c.data]
		if !ok {
			t.Errorf("%q did not arrive", c.data)
			continue
		}
		if fmt.Sprint(h) != fmt.Sprint(c.want) {
			t.Errorf("%q arrived with headers %v, want %v", c.data, h, c.want)
		}
	}
}

// TestNATSRegistrationTakesNoAdoptedChannel: a channel an adopted nexlet opens on
// nexd's socket serves only a registration that comes on it. Here such a channel is
// held by a rogue end (as one the nexlets manager's peer check had let through would
// be), handed to the victim's agent id with its start's key, and says it serves
// starts; the victim then registers over NATS, signed with that key, as an adopted
// nexlet that does not dial the socket (an older one) does. The victim's deploy goes to
// it over NATS, none to the rogue end, and the rogue end's line in the victim's
// workload's log is dropped. Before, the registration took the channel as its start's
// pair: the start request, workload credentials and all, went to the rogue end (the
// deploy never answered) and its forged lines passed as the victim's.
func TestNATSRegistrationTakesNoAdoptedChannel(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	var rogueEnd *localchan.Server
	acks := make(chan error, 4)
	var starts atomic.Int32
	rf.minted("agent0", "native-nexlet", "native", func(a *fakeAgent) {
		signedStart(n, true)(a)
		pub, _ := a.key.PublicKey()
		var c *localchan.Client
		c, rogueEnd = localEnds(t)
		if err := rogueEnd.Announce(); err != nil {
			t.Fatal(err)
		}
		n.SetAdoptedLocal(a.id, pub, c)
		rogueEnd.OnFeedAck = func(_ uint64, err error) { acks <- err }
		done := make(chan struct{})
		go func() { defer close(done); _ = rogueEnd.Serve(func(*localchan.Request) { starts.Add(1) }) }()
		t.Cleanup(func() { _ = rogueEnd.StopServing(); <-done })
	})
	wid := rf.deployOne("tenant")
	if k := starts.Load(); k > 0 {
		t.Fatalf("%d start requests went to the rogue end of the adopted channel", k)
	}
	feed := rf.tenantFeed()
	sendFeeds(t, rogueEnd, acks, 1, feedMsg(protocol.LogSubject("tenant", wid, "stdout"), "forged on an adopted channel"))
	if got := feedMsgs(feed); len(got) > 0 {
		t.Errorf("the rogue end's line reached the tenant: %q", got[0].Data)
	}
}
