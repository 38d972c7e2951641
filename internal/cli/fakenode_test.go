package cli

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

// fakeNode plays a Nex node with raw NATS subscriptions, answering as upstream's
// node does (silence for "not mine"), so the fleet commands are tested on the wire.
type fakeNode struct {
	t  *testing.T
	nc *nats.Conn
	id string
	// key, when set (newSigningFakeNode; id is its public key), signs its bids and
	// every reply to a request that carries a nonce, as a nexd node does.
	key  nkeys.KeyPair
	tags map[string]string
	xkey nkeys.KeyPair // the nexlet's curve key, used in bids
	bid  bool          // whether it bids at all (a healthy native nexlet)
	// dropAuctions is how many auctions it drops before bidding, as a node shedding
	// an auction flood drops some of any namespace's (nexd before per-namespace intake).
	dropAuctions int
	// full withholds every bid though its info lists a healthy native nexlet (an
	// upstream node whose nexlet is at max_workloads: its info does not say so).
	full bool
	// infoRefused answers INFO with an error, as the server refuses a tenant's INFO
	// (the system namespace's subject); infoHealth, when set, is its nexlet's health
	// in INFO (unknown: registered, its first heartbeat not yet in).
	infoRefused bool
	infoHealth  string
	load        int // nexd_workload_count in its bids
	// bidAfter, when set, holds each bid until it is closed (10 s at most).
	bidAfter   <-chan struct{}
	failDeploy string // when set, ADEPLOY answers with this micro error
	// unknownOutcome leaves HeaderDeployOutcome off failDeploy's error (a node that
	// cannot say the workload did not start).
	unknownOutcome bool
	schema         string
	workloads      []protocol.WorkloadSummary
	stored         map[string]protocol.StartWorkloadRequest // for CLONE
	stopOK         bool
	// stopWord, when set, is the "stopping" word (a body-less Nex-Progress reply with
	// these headers too) it sends a stop that asks for progress before its answer,
	// which then comes only when wordOnly is false.
	stopWord nats.Header
	wordOnly bool
	// stopFail, when set, answers a stop (after the word) with this error, code 500,
	// naming the node (HeaderNode), as a nexd node whose stop failed there does.
	stopFail string
	// heldDeploy, when set, hears each deploy, which is never answered (a start
	// still under way).
	heldDeploy chan<- struct{}
	// goneAfterAlive sends a deploy that asks for keep-alives (HeaderAlive) one,
	// numbered as a nexd node numbers its signed replies (HeaderSeq), and nothing
	// more: a node gone mid-request.
	goneAfterAlive bool
	// stopGate, when set, holds its stop's answer until closed (a holder loaded enough
	// to answer after the other nodes; the test closes it on an event of its own).
	stopGate <-chan struct{}
	// answerDelay holds its deploy, stop and clone answers this long (a loaded node,
	// or a slow start: anyone else's answer comes first).
	answerDelay time.Duration
	// controlDelay holds its INFO, PTAGS and LAMEDUCK answers this long (a loaded node:
	// anyone else's answer comes first).
	controlDelay time.Duration
	// progress are reports sent before a deploy's answer when the client asks.
	progress []protocol.Progress
	// drains makes it act as a nexd node on LAMEDUCK: after the delay its workloads
	// stop (WORKLOADSTOPPED events, the first kills of them "killed after" their grace)
	// and its load drops to 0; its WPING replies name it (HeaderNode). It drains only
	// once it also answered an INFO after the LAMEDUCK, so a watcher slowed by a loaded
	// host still sees the workloads it had before they stop.
	drains bool
	kills  int
	// partial, when set, goes on its WPING replies (Nex-Partial) while drains: a
	// nexlet that does not answer the node, whose workloads the nexlets' counts miss.
	partial *protocol.PartialList
	// listError, when set, answers WPING with this error (code 413, as a nexd node
	// whose list is over max_payload), naming the node (HeaderNode) unless
	// listErrorUnnamed.
	listError        string
	listErrorUnnamed bool
	subs             []*nats.Subscription

	mu        sync.Mutex
	deploys   []protocol.StartWorkloadRequest
	auctions  int // auctions it would bid in, dropped ones included
	lameducks []protocol.LameduckRequest
	stops     []string // subjects
	pings     int
	clones    []protocol.CloneWorkloadRequest
	// partialDrained counts the WPING replies it sent with Nex-Partial once its load
	// was 0 (after a drain).
	partialDrained int
	// A LAMEDUCK's drain (drainPending) waits for its delay's end (delayOver) and an
	// INFO answered after it (infoAnswered); whichever comes last drains.
	drainPending, delayOver, infoAnswered bool
}

func newFakeNode(t *testing.T, nc *nats.Conn, id string, tags map[string]string) *fakeNode {
	xk, err := nkeys.CreateCurveKeys()
	if err != nil {
		t.Fatal(err)
	}
	all := map[string]string{protocol.TagNexus: "nexus", protocol.TagNode: strings.ToLower(id)}
	for k, v := range tags {
		all[k] = v
	}
	return &fakeNode{t: t, nc: nc, id: id, tags: all, xkey: xk, bid: true, schema: nativeSchema, stored: map[string]protocol.StartWorkloadRequest{}}
}

// newSigningFakeNode is a fake node that signs as a nexd node does: its id is its
// server key's public key.
func newSigningFakeNode(t *testing.T, nc *nats.Conn, tags map[string]string) *fakeNode {
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := kp.PublicKey()
	n := newFakeNode(t, nc, id, tags)
	n.key = kp
	return n
}

// reply sends out to req's reply subject, signed when the node signs and req carries a
// nonce (protocol.SignAnswer, as daemon/node does).
func (n *fakeNode) reply(req, out *nats.Msg) {
	out.Subject = req.Reply
	if nonce := req.Header.Get(protocol.HeaderNonce); n.key != nil && nonce != "" {
		if out.Header == nil {
			out.Header = nats.Header{}
		}
		if err := protocol.SignAnswer(n.key, n.id, nonce, req.Subject, out.Header, out.Data); err != nil {
			n.t.Errorf("fake node: %v", err)
		}
	}
	_ = n.nc.PublishMsg(out)
}

func (n *fakeNode) matches(filter map[string]string) bool {
	for k, v := range filter {
		if n.tags[k] != v {
			return false
		}
	}
	return true
}

func (n *fakeNode) respond(m *nats.Msg, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		n.t.Errorf("fake node: %v", err)
		return
	}
	n.reply(m, &nats.Msg{Data: b})
}

func (n *fakeNode) respondError(m *nats.Msg, code, text string) {
	n.respondErrorWith(m, code, text, text, nil)
}

// respondErrorWith is respondError with desc in the micro error header, text in the
// body, and the headers of h.
func (n *fakeNode) respondErrorWith(m *nats.Msg, code, desc, text string, h nats.Header) {
	r := nats.NewMsg(m.Reply)
	for k, v := range h {
		r.Header[k] = v
	}
	r.Header.Set(protocol.HeaderErrorCode, code)
	r.Header.Set(protocol.HeaderError, desc)
	r.Data, _ = json.Marshal(protocol.ErrorBody{ErrorID: "E1", Error: text})
	n.reply(m, r)
}

func (n *fakeNode) sub(subject string, h nats.MsgHandler) {
	s, err := n.nc.Subscribe(subject, h)
	if err != nil {
		n.t.Fatal(err)
	}
	n.subs = append(n.subs, s)
	n.t.Cleanup(func() { _ = s.Unsubscribe() })
}

// vanish plays the node shutting down: it answers nothing from now on.
func (n *fakeNode) vanish() {
	for _, s := range n.subs {
		_ = s.Unsubscribe()
	}
}

// setPartial changes what its WPING replies say in Nex-Partial (nil: whole).
func (n *fakeNode) setPartial(p *protocol.PartialList) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.partial = p
}

// info answers INFO; true when it is the answer a pending drain waited for after its
// delay.
func (n *fakeNode) info(m *nats.Msg) (drainNow bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.infoRefused {
		n.respondError(m, "403", "permissions violation")
		return false
	}
	health := protocol.HealthHealthy
	if !n.bid {
		health = protocol.HealthOffline
	}
	if n.infoHealth != "" {
		health = n.infoHealth
	}
	n.respond(m, protocol.NodeInfoResponse{NodeID: n.id, Tags: n.tags, Uptime: "1h0m0s", Version: "0.0.1", XKey: "XNODE",
		NodeAgentSummaries: []protocol.NodeAgentSummary{{AgentID: "A1", AgentHealth: health,
			AgentSummary: protocol.AgentSummary{Name: "go_exec", Type: "native", Version: "0.0.1", WorkloadCount: n.load}}}})
	if n.drainPending && !n.infoAnswered {
		n.infoAnswered = true
		return n.delayOver
	}
	return false
}

// drain stops every workload as a lame duck nexd does at the end of its delay.
func (n *fakeNode) drain() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i, w := range n.workloads {
		ev := protocol.WorkloadStoppedEvent{ID: w.ID, Namespace: deref(w.Namespace), WorkloadType: "native"}
		if i < n.kills {
			ev.Error = &protocol.EventError{Code: "-1", Message: "killed after a stop grace of 1s"}
		}
		b, _ := json.Marshal(ev)
		_ = n.nc.Publish(protocol.EventSubject(deref(w.Namespace), protocol.EventWorkloadStopped), b)
	}
	n.workloads, n.load = nil, 0
}

func (n *fakeNode) start() *fakeNode {
	xpub, _ := n.xkey.PublicKey()
	ping := func(m *nats.Msg) {
		var req protocol.NodePingRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			n.respondError(m, "400", err.Error())
			return
		}
		if !n.matches(req.Filter) {
			return // silent, as upstream
		}
		n.mu.Lock()
		n.pings++
		n.mu.Unlock()
		n.respond(m, protocol.NodePingResponse{NodeID: n.id, Version: "0.0.1", State: protocol.NodeRunning, StartTime: time.Now().Add(-time.Hour),
			Tags: n.tags, XKey: "XNODE", AgentCount: 1})
	}
	n.sub(protocol.PingSubject(), ping)
	n.sub(protocol.PingNodeSubject(n.id), ping)
	n.sub(protocol.PTagsSubject(), func(m *nats.Msg) {
		time.Sleep(n.controlDelay)
		n.respond(m, n.tags)
	})
	n.sub(protocol.InfoSubject(n.id), func(m *nats.Msg) {
		time.Sleep(n.controlDelay)
		if n.info(m) {
			n.drain()
		}
	})
	n.sub(protocol.LameduckSubject(n.id), func(m *nats.Msg) {
		var req protocol.LameduckRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			n.respondError(m, "400", err.Error())
			return
		}
		if !n.matches(req.Tag) {
			return
		}
		time.Sleep(n.controlDelay)
		n.mu.Lock()
		n.lameducks = append(n.lameducks, req)
		start := n.drains && !n.drainPending
		n.drainPending = n.drainPending || n.drains
		n.mu.Unlock()
		n.respond(m, protocol.LameduckResponse{Success: true, Message: "node entering lameduck mode"})
		if start {
			delay, _ := req.ParseDelay()
			time.AfterFunc(delay, func() {
				// The watcher's first INFO (the workloads not yet stopped) may come
				// later than the delay on a loaded host: the drain waits for it.
				n.mu.Lock()
				n.delayOver = true
				now := n.infoAnswered
				n.mu.Unlock()
				if now {
					n.drain()
				}
			})
		}
	})
	n.sub("$NEX.SVC.*.control.AUCTION", func(m *nats.Msg) {
		var req protocol.AuctionRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			n.respondError(m, "400", err.Error())
			return
		}
		if !n.bid || req.AgentType != "native" || !n.matches(req.Tags) {
			return
		}
		n.mu.Lock()
		if n.full {
			n.auctions++
			n.mu.Unlock()
			return
		}
		n.auctions++
		drop := n.auctions <= n.dropAuctions
		n.mu.Unlock()
		if drop {
			return
		}
		if n.bidAfter != nil {
			select {
			case <-n.bidAfter:
			case <-time.After(10 * time.Second):
			}
		}
		bid := protocol.AuctionResponse{BidderID: "bid-" + n.id, StartRequestSchema: n.schema,
			SupportedLifecycles: []protocol.Lifecycle{"service", "job"}, XKey: xpub, NodeID: n.id, NodeName: n.tags[protocol.TagNode], WorkloadCount: n.load}
		if n.key != nil {
			sig, _ := n.key.Sign(protocol.BidPayload(protocol.NamespaceOf(m.Subject), req.AuctionID, bid))
			bid.Sig = base64.StdEncoding.EncodeToString(sig)
		}
		n.respond(m, bid)
	})
	n.sub("$NEX.SVC.*.control.ADEPLOY.bid-"+n.id, func(m *nats.Msg) {
		var req protocol.StartWorkloadRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			n.respondError(m, "400", err.Error())
			return
		}
		n.mu.Lock()
		n.deploys = append(n.deploys, req)
		n.mu.Unlock()
		if n.heldDeploy != nil {
			n.heldDeploy <- struct{}{}
			return
		}
		if n.goneAfterAlive {
			if m.Header.Get(protocol.HeaderAlive) != "" {
				n.reply(m, &nats.Msg{Header: nats.Header{protocol.HeaderAlive: {"1"}, protocol.HeaderSeq: {"1"}}})
			}
			return
		}
		time.Sleep(n.answerDelay)
		if n.failDeploy != "" {
			h := nats.Header{}
			if !n.unknownOutcome {
				h.Set(protocol.HeaderDeployOutcome, protocol.DeployNotStarted)
			}
			n.respondErrorWith(m, "500", n.failDeploy, n.failDeploy, h)
			return
		}
		if m.Header.Get(protocol.HeaderProgress) != "" {
			for _, p := range n.progress {
				h := nats.Header{protocol.HeaderProgress: {p.Text}}
				if p.HasBytes() {
					h.Set(protocol.HeaderProgressBytes, protocol.FormatProgressBytes(p.Done, p.Total))
				}
				n.reply(m, &nats.Msg{Header: h})
			}
		}
		n.respond(m, protocol.StartWorkloadResponse{ID: "W-" + n.id, Name: req.Name})
	})
	n.sub("$NEX.SVC.*.control.WPING", func(m *nats.Msg) {
		var req protocol.AgentListWorkloadsRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			n.respondError(m, "400", err.Error())
			return
		}
		out := []protocol.WorkloadSummary{}
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.listError != "" {
			h := nats.Header{protocol.HeaderNode: {n.id}}
			if n.listErrorUnnamed {
				h = nil
			}
			n.respondErrorWith(m, "413", n.listError, n.listError, h)
			return
		}
		for _, w := range n.workloads {
			if req.Namespace != protocol.SystemNamespace && deref(w.Namespace) != req.Namespace {
				continue
			}
			if len(req.Filter) > 0 && !contains(req.Filter, w.ID) && !contains(req.Filter, w.Name) {
				continue
			}
			out = append(out, w)
		}
		if n.drains {
			r := nats.NewMsg(m.Reply)
			r.Header.Set(protocol.HeaderNode, n.id)
			if n.partial != nil {
				b, _ := json.Marshal(n.partial)
				r.Header.Set(protocol.HeaderPartial, string(b))
				if n.load == 0 {
					n.partialDrained++
				}
			}
			r.Data, _ = json.Marshal(out)
			n.reply(m, r)
			return
		}
		n.respond(m, out)
	})
	n.sub("$NEX.SVC.*.control.UNDEPLOY.*", func(m *nats.Msg) {
		n.mu.Lock()
		n.stops = append(n.stops, m.Subject)
		n.mu.Unlock()
		id := protocol.LastToken(m.Subject)
		time.Sleep(n.answerDelay)
		if n.stopGate != nil {
			<-n.stopGate
		}
		if n.stopWord != nil && m.Header.Get(protocol.HeaderProgress) != "" {
			h := nats.Header{protocol.HeaderProgress: {"stopping"}}
			for k, v := range n.stopWord {
				h[k] = v
			}
			n.reply(m, &nats.Msg{Header: h})
			if n.wordOnly {
				return
			}
		}
		if n.stopFail != "" {
			n.respondErrorWith(m, "500", "failed to ask nexlets to stop a workload", n.stopFail, nats.Header{protocol.HeaderNode: {n.id}})
			return
		}
		n.respond(m, protocol.StopWorkloadResponse{ID: id, Stopped: n.stopOK, Message: map[bool]string{true: "stopped", false: "workload not found"}[n.stopOK], WorkloadType: "native"})
	})
	n.sub("$NEX.SVC.*.control.CLONE.*", func(m *nats.Msg) {
		var cr protocol.CloneWorkloadRequest
		_ = json.Unmarshal(m.Data, &cr)
		n.mu.Lock()
		n.clones = append(n.clones, cr)
		n.mu.Unlock()
		req, ok := n.stored[protocol.LastToken(m.Subject)]
		if !ok {
			return
		}
		time.Sleep(n.answerDelay)
		n.respond(m, req)
	})
	if err := n.nc.Flush(); err != nil {
		n.t.Fatal(err)
	}
	return n
}

func (n *fakeNode) deployed() []protocol.StartWorkloadRequest {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]protocol.StartWorkloadRequest(nil), n.deploys...)
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
