package node

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/internal/stopmemo"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/protocol"
)

type endpoint struct {
	name, subject, queue string // queue "" = the node id
	handle               func(micro.Request)
	async                bool // may wait on nexlets: runs on its own goroutine
	// signs: a control endpoint, whose replies to a request with a nonce are signed
	// (signing); not the agent plane's, whose callers are nexlets.
	signs bool
}

// endpoints lists the nexnode service, names and subjects as upstream registers them,
// but for AuctionRequest: the AUCTION subject is a plain subscription (Start,
// onAuction), which keeps micro's per-request work off the one goroutine a flood of
// auctions must not outpace.
func (n *Node) endpoints() []endpoint {
	all := protocol.ControlPrefix("*")
	eps := []endpoint{
		{name: "PingPlacementTags", subject: protocol.PTagsSubject(), handle: n.handlePTags, signs: true},
		{name: "PingNexus", subject: protocol.PingSubject(), handle: n.handlePing, signs: true},
		{name: "PingNode", subject: protocol.PingNodeSubject(n.id), handle: n.handlePing, signs: true},
		{name: "GetNodeInfo", subject: protocol.InfoSubject(n.id), handle: n.handleInfo, signs: true},
		{name: "SetLameduck", subject: protocol.LameduckSubject(n.id), handle: n.handleLameduck, signs: true},
		{name: "GetAgentIdByName", subject: protocol.AgentIDSubject(n.id), handle: n.handleAgentID, signs: true},
		{name: "RegisterAgent", subject: protocol.RegisterSubject(n.id, "*"), handle: n.handleRegister},
		{name: "StopWorkload", subject: all + ".UNDEPLOY.*", handle: n.handleUndeploy, async: true, signs: true},
		{name: "AuctionDeployWorkload", subject: all + ".ADEPLOY.*", handle: n.handleDeploy, async: true, signs: true},
		{name: "CloneWorkload", subject: all + ".CLONE.*", handle: n.handleClone, async: true, signs: true},
		{name: "NamespacePingRequest", subject: all + ".WPING", handle: n.handleWPing, async: true, signs: true},
		n.renewEndpoint(),
		n.renewAgentEndpoint(),
		{name: "WorkloadEnded", subject: protocol.WorkloadEndedSubject(n.id, "*", "*"), handle: n.handleWorkloadEnded},
	}
	if n.o.AllowRemoteRegistration {
		eps = append(eps, endpoint{name: "RegisterRemoteAgent", subject: protocol.RemoteRegisterSubject(n.o.Nexus),
			queue: n.o.Nexus, handle: n.handleRemoteRegister})
	}
	return eps
}

// subjectNamespace returns the namespace of a control subject and checks it against
// the body's: a caller may act only in its own namespace unless it is system.
func (n *Node) checkNamespace(r micro.Request, bodyNS string) (string, bool) {
	ns := protocol.NamespaceOf(r.Subject())
	if ns != bodyNS && ns != protocol.SystemNamespace {
		n.fail(r, 403, "namespace mismatch", fmt.Errorf("namespace mismatch: subject namespace %q, request namespace %q", ns, bodyNS))
		return ns, false
	}
	return ns, true
}

func (n *Node) handlePTags(r micro.Request) {
	n.respondJSON(r, n.Tags())
}

func (n *Node) handlePing(r micro.Request) {
	var req protocol.NodePingRequest
	// upstream's decoder takes a JSON null as "no filter".
	if !bytes.Equal(bytes.TrimSpace(r.Data()), []byte("null")) {
		if err := protocol.Decode(r.Data(), &req); err != nil {
			n.fail(r, 400, "bad ping request", err)
			return
		}
	}
	resp := n.Ping()
	if !protocol.TagsMatch(req.Filter, resp.Tags) {
		return
	}
	n.respondJSON(r, resp)
}

func (n *Node) handleInfo(r micro.Request) {
	// The body is {} on the wire; an empty body is fine too, anything else must be
	// a JSON object.
	if len(bytes.TrimSpace(r.Data())) > 0 {
		var req protocol.NodeInfoRequest
		if err := protocol.Decode(r.Data(), &req); err != nil {
			n.fail(r, 400, "bad node info request", err)
			return
		}
	}
	n.respondJSON(r, n.Info())
}

func (n *Node) handleLameduck(r micro.Request) {
	var req protocol.LameduckRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad lameduck request", err)
		return
	}
	if !protocol.TagsMatch(req.Tag, n.Tags()) {
		return
	}
	delay, err := req.ParseDelay()
	if err != nil {
		n.fail(r, 400, "bad lameduck delay", fmt.Errorf("invalid LameduckRequest: field \"delay\": %w", err))
		return
	}
	nonce := r.Headers().Get(protocol.HeaderDrainWait)
	if nonce != "" {
		if err := protocol.CheckDrainNonce(nonce); err != nil {
			n.fail(r, 400, "bad lameduck request", err)
			return
		}
	}
	already, _ := n.Lameduck()
	until, err := n.EnterLameduck(delay)
	if err != nil {
		n.fail(r, 400, "cannot enter lameduck", fmt.Errorf("node %s cannot enter lameduck mode: %w", n.id, err))
		return
	}
	msg := "node entering lameduck mode, will shutdown at " + until.UTC().Format(time.RFC3339)
	if already {
		msg = "node already in lameduck mode, will shutdown at " + until.UTC().Format(time.RFC3339)
	}
	resp := protocol.LameduckResponse{Message: msg, Success: true}
	if nonce != "" && r.Reply() != "" {
		resp.Drain = n.waitDrain(r.Reply(), nonce, r.Headers().Get(protocol.HeaderDrainAck) != "")
	}
	n.respondJSON(r, resp)
}

func (n *Node) handleAgentID(r micro.Request) {
	name := strings.TrimSpace(string(r.Data()))
	if name == "" {
		n.fail(r, 400, "agent name is required", errors.New("agent name is required (send the name as the raw request body)"))
		return
	}
	n.mu.Lock()
	id := ""
	for _, a := range n.agents {
		if a.req.Name == name {
			id = a.id
			break
		}
	}
	n.mu.Unlock()
	if id == "" {
		return // upstream is silent for an unknown name
	}
	if err := r.Respond([]byte(id)); err != nil {
		n.log.Warn("failed to send reply", "subject", r.Subject(), "err", err)
	}
}

func (n *Node) handleAuction(r micro.Request) {
	var st *steps.Timer // nil unless the node logs at debug level
	if d, ok := r.(*detachedRequest); ok {
		st = d.steps
	}
	st.Step("queue") // from the subscription to an auction worker
	var req protocol.AuctionRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.notBid(noBidBadRequest)
		n.fail(r, 400, "bad auction request", err)
		return
	}
	if req.Lifecycle != "" && !req.Lifecycle.Valid() {
		n.notBid(noBidBadRequest)
		n.fail(r, 400, "bad auction request", fmt.Errorf("invalid AuctionRequest: field \"nexd_workload_lifecycle\": %q is not one of service, job, function", req.Lifecycle))
		return
	}
	if n.o.CanBid != nil {
		if err := n.o.CanBid(); err != nil {
			n.notBid(noBidStateStore)
			n.log.Debug("not bidding", "auction_id", req.AuctionID, "err", err)
			return
		}
	}
	now := time.Now()
	ns := auctionNamespace(r.Subject())
	resp, static, ok := n.bidLocked(r, ns, req, now)
	if !ok {
		return
	}
	st.Step("check") // decode, the node's state, tags, a nexlet to bid for, the bid recorded
	if n.o.Observer != nil {
		defer func() { n.o.Observer.Auction(time.Since(now)) }()
	}
	// Signed with the node's key: nobody else on the bus can pose as this node, nor
	// put another xkey into its bid.
	if sig, err := n.o.NodeKey.Sign(protocol.BidPayload(ns, req.AuctionID, resp)); err == nil {
		resp.Sig = base64.StdEncoding.EncodeToString(sig)
	} else {
		n.log.Warn("bid not signed", "auction_id", req.AuctionID, "err", err)
	}
	st.Step("sign")
	// nats.go copies what it publishes: the buffer serves the next bid.
	buf, _ := n.bidBufs.Get().(*[]byte)
	if buf == nil {
		buf = new([]byte)
	}
	*buf = appendBid((*buf)[:0], resp.BidderID, static, resp.WorkloadCount, resp.Sig)
	if err := r.Respond(*buf); err != nil {
		n.log.Warn("failed to send reply", "subject", r.Subject(), "err", err)
	}
	n.bidBufs.Put(buf)
	st.Step("reply") // encoded and published
	st.Log(n.log, "auction steps", "auction_id", req.AuctionID)
}

// bidLocked decides under the node's lock whether to bid in namespace ns (the
// auction subject's) and records the bid; ok is false when the node does not bid.
// static is the encoding of the bid's fixed fields (bidStatic). The signature and the
// reply come after, outside the lock, which deploys, registrations and heartbeats take
// too.
func (n *Node) bidLocked(r micro.Request, ns string, req protocol.AuctionRequest, now time.Time) (resp protocol.AuctionResponse, static []byte, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	// The debug lines only when enabled: their arguments alone allocate.
	debug := n.log.Enabled(context.Background(), slog.LevelDebug)
	if !n.lameduck.IsZero() || n.state == protocol.NodeStopping {
		n.notBid(noBidDraining)
		if debug {
			n.log.Debug("not bidding: node is draining", "auction_id", req.AuctionID, "state", n.state)
		}
		return resp, nil, false
	}
	if !n.tagsMatchLocked(req.Tags) {
		n.notBid(noBidTags)
		if debug {
			n.log.Debug("not bidding: tags do not match", "auction_id", req.AuctionID, "tags", req.Tags)
		}
		return resp, nil, false
	}
	// A deploy following an auction in ns is into ns (one of the system namespace may
	// name any): where its workload's credentials would not fit the control line (a
	// long nats.jsdomain), the deploy would refuse it.
	if ns != protocol.SystemNamespace && !n.o.Minter.WorkloadNamespaceFits(ns) {
		n.notBid(noBidCredentials)
		if debug {
			n.log.Debug("not bidding: the namespace's workload credentials would not fit nats-server's control line", "auction_id", req.AuctionID, "namespace", ns)
		}
		return resp, nil, false
	}
	a, why := n.pickAgentLocked(req.AgentType, req.Lifecycle, now)
	if a == nil {
		n.notBid(why.reason)
		if debug {
			n.log.Debug("not bidding", "auction_id", req.AuctionID, "reason", why.String())
		}
		return resp, nil, false
	}
	bidderID := randid.New()
	n.bids.add(bidderID, bid{agentID: a.id, ns: ns, expires: now.Add(n.o.AuctionTTL)})
	if a.bid == nil {
		lifecycles := a.req.SupportedLifecycles
		if len(lifecycles) == 0 {
			lifecycles = []protocol.Lifecycle{protocol.LifecycleService, protocol.LifecycleJob, protocol.LifecycleFunction}
		}
		a.bid = bidStatic(a.req.StartRequestSchema, lifecycles, a.req.PublicXKey, n.id, n.o.Name)
	}
	// What the signature covers (BidPayload) and what the encoding adds to a.bid.
	return protocol.AuctionResponse{
		BidderID:      bidderID,
		XKey:          a.req.PublicXKey,
		NodeID:        n.id,
		WorkloadCount: n.totalWorkloadsLocked(),
	}, a.bid, true
}

// takeBid removes and returns a live bid: a bidder id deploys at most once.
func (n *Node) takeBid(id string) (bid, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	b, ok := n.bids.take(id)
	return b, ok && time.Now().Before(b.expires)
}

func (n *Node) relay(r micro.Request, reply *nats.Msg) {
	var opts []micro.RespondOpt
	if len(reply.Header) > 0 {
		opts = append(opts, micro.WithHeaders(micro.Headers(reply.Header)))
	}
	if err := r.Respond(reply.Data, opts...); err != nil {
		n.log.Warn("failed to relay nexlet reply", "subject", r.Subject(), "err", err)
	}
}

// validateRunRequest checks a run_request string against a nexlet's compiled schema.
func validateRunRequest(schema *jsonschema.Schema, runRequest string) error {
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(runRequest))
	if err != nil {
		return fmt.Errorf("not valid JSON: %w", err)
	}
	if err := schema.Validate(doc); err != nil {
		return fmt.Errorf("does not match the nexlet's start request schema: %w", err)
	}
	return nil
}

// stopWorkload fans STOPWORKLOAD out to the node's nexlets and returns the first
// stopped:true reply, or upstream's "workload not found" answer. A nexlet answers once
// the workload is gone (its grace, then a kill), so for a workload this node owns the
// wait is StopTimeout; an owned workload no nexlet confirmed in that time is reported
// as still stopping, never as not found. A workload whose stop a nexlet confirmed
// lately is answered from memory: stopped, "already stopped at T" (nexd_already_stopped_at).
// Not while the node owns it again (its removal from state failed and a replay runs it
// again): then its nexlets are asked, and the memory answers only when none holds it
// (TestRepeatStopOfAWorkloadRunningAgain).
func (n *Node) stopWorkload(ctx context.Context, namespace, workloadID string) (protocol.StopWorkloadResponse, error) {
	return n.stopWorkloadSaying(ctx, namespace, workloadID, nil, true)
}

// stopWorkloadSaying is stopWorkload that, for a workload this node owns, calls
// stopping (at most once, before it returns, unless the answer came first) with the
// headers of the node's "stopping" word to a client that does not wait: see stopAck.
//
// mayWait false: the caller runs on a subscription's own goroutine (the node's request
// goroutines all taken), which must not wait for a nexlet that is not registered.
func (n *Node) stopWorkloadSaying(ctx context.Context, namespace, workloadID string, stopping func(nats.Header), mayWait bool) (protocol.StopWorkloadResponse, error) {
	n.mu.Lock()
	o, owned := n.owned[workloadID]
	st, starting := n.starting[workloadID]
	n.mu.Unlock()
	placedNS := o.ns
	if !owned && starting {
		placedNS = st.ns // its deploy is in flight
	}
	if !owned && !starting && namespace != protocol.SystemNamespace {
		// Not placed in this run yet (its nexlet has not registered again since nexd
		// started), but node state may hold it: its namespace is known from there.
		ns, err := n.recordedNamespace(ctx, workloadID)
		if err != nil {
			return protocol.StopWorkloadResponse{ID: workloadID, Message: protocol.ErrTextWorkloadNotFound}, err
		}
		placedNS = ns
	}
	if placedNS != "" && namespace != placedNS && namespace != protocol.SystemNamespace {
		// Another namespace's workload, as the node placed it: not found, and no
		// nexlet is asked. A nexlet may take a stop of a workload it does not hold in
		// the request's namespace for a no-op and answer it stopped (a version of
		// upstream's native nexlet does, through its SDK), and the node then dropped the
		// running workload from its state for the other tenant
		// (TestAttackTenantStopsAnothersWorkloadOnLaxNexlet; right after a restart,
		// before its nexlet registered again, from node state:
		// TestAttackTenantStopsAnothersWorkloadRightAfterRestart).
		return protocol.StopWorkloadResponse{ID: workloadID, Message: protocol.ErrTextWorkloadNotFound}, nil
	}
	if e, ok := n.stopped.Get(workloadID, namespace, time.Now()); ok && !owned {
		return e.Answer(workloadID), nil
	}
	// While the nexlet stops it, a list round that no longer finds it leaves it to this
	// stop (listends.go), which removes it once answered; remembered before this returns.
	// Only a stop that can end it: one from another namespace, which its nexlet answers
	// "not found", must not hide its end (a tenant flooding such stops delayed a job's
	// end by seconds, TestStopsFromAnotherNamespaceDoNotHideAnEnd).
	if owned && (namespace == o.ns || namespace == protocol.SystemNamespace) {
		n.mu.Lock()
		n.stopsInFlight[workloadID]++
		n.mu.Unlock()
		defer func() {
			n.mu.Lock()
			if n.stopsInFlight[workloadID]--; n.stopsInFlight[workloadID] <= 0 {
				delete(n.stopsInFlight, workloadID)
			}
			n.mu.Unlock()
		}()
	}
	defer n.changes.Add(1)
	ret := protocol.StopWorkloadResponse{ID: workloadID, Message: protocol.ErrTextWorkloadNotFound}
	n.mu.Lock()
	keep := n.keep // a stop at shutdown: the workload stays in node state
	n.mu.Unlock()
	var ack func(*registration)
	if owned && stopping != nil && keep {
		stopping(nil) // at nexd's shutdown: the workload starts again anyway
	} else if owned && stopping != nil {
		var settle func(stopped bool)
		ack, settle = n.stopAck(workloadID, o, stopping)
		defer func() { settle(ret.Stopped) }() // before the answer: no "stopping" after it
	}
	body, err := protocol.Marshal(protocol.StopWorkloadRequest{Namespace: namespace, Keep: keep, RecordAck: ack != nil})
	if err != nil {
		return ret, err
	}
	wait := n.o.FanoutTimeout
	if owned {
		wait = n.o.StopTimeout
	}
	if owned && !keep && (namespace == o.ns || namespace == protocol.SystemNamespace) {
		// Its nexlet may be between two lives (crashed and being restarted, a remote one
		// reconnecting): the node keeps the workload, and the successor's registration
		// gets it back and runs it on. The stop waits for it, within its bound. Before,
		// it asked the nexlets registered then, was answered "not found", and the
		// workload ran on (TestStopWhileOwnerRestarts).
		began := time.Now()
		bound := min(wait, ownerReturnWait)
		absent := !n.ownerServing(o.owner)
		if absent && !mayWait {
			// Run on the UNDEPLOY subscription's own goroutine: waiting here held every
			// stop on the node behind this one (TestStopsWaitingForAnAbsentOwnerDoNotHoldTheNode).
			ret.Message = fmt.Sprintf("not stopped: nexlet %s, which runs it, is not registered (restarting?), and the node has no request goroutine free to wait for it; the node keeps the workload; stop it again",
				o.owner)
			return ret, nil
		}
		if absent && namespace != protocol.SystemNamespace {
			// One of a tenant's stops of it waits at a time: each held one of the
			// node's 64 request goroutines for the bound, and a tenant sending them in
			// a loop held them all, and then the subscription's own, so every other
			// stop waited behind them (a minute each,
			// TestStopsWaitingForAnAbsentOwnerDoNotHoldTheNode). System's stops (the
			// operator's, the drain's) wait each.
			n.mu.Lock()
			already := n.ownerWaits[workloadID]
			n.ownerWaits[workloadID] = true
			n.mu.Unlock()
			if already {
				ret.Message = fmt.Sprintf("not stopped yet: nexlet %s, which runs it, is not registered (restarting?), and an earlier stop of it waits up to %s for it to come back and stops it there; the node keeps the workload meanwhile",
					o.owner, bound)
				return ret, nil
			}
			defer func() {
				n.mu.Lock()
				delete(n.ownerWaits, workloadID)
				n.mu.Unlock()
			}()
		}
		if !n.awaitOwner(ctx, o.owner, bound) {
			ret.Message = fmt.Sprintf("not stopped: nexlet %s, which runs it, is not registered (restarting?) and did not come back within %s; the node keeps the workload, and that nexlet gets it back when it registers again",
				o.owner, bound)
			return ret, ctx.Err()
		}
		wait = max(wait-time.Since(began), n.o.FanoutTimeout)
	}
	answered := 0
	failure := "" // a nexlet that holds the workload could not stop it
	asked, err := n.askNexletsWith(ctx, protocol.StopWorkloadSubject(n.id, workloadID), func(id string) string {
		return protocol.StopWorkloadAgentSubject(n.id, id, workloadID)
	}, body, wait, askOpts{ack: ack}, func(m *nats.Msg, from *registration) bool {
		answered++
		var resp protocol.StopWorkloadResponse
		decodeErr := protocol.Decode(m.Data, &resp)
		if isErrorReply(m) || decodeErr != nil || !resp.Stopped {
			// "Not found" is every other nexlet's answer; anything else from one that
			// may speak for the workload is its stop's failure, which must not read as
			// "not found" (a drain then took the workload for gone and ended clean).
			msg := resp.Message
			if decodeErr != nil || msg == "" {
				msg = m.Header.Get(protocol.HeaderError)
			}
			if msg != "" && msg != protocol.ErrTextWorkloadNotFound && failure == "" && n.speaksFor(workloadID, from, "stop failure") {
				failure = msg
			}
			return true
		}
		if !n.speaksFor(workloadID, from, "stop confirmation") {
			return true
		}
		if from != nil {
			// The type its state is kept under: the nexlet's, not what it says.
			resp.WorkloadType = from.req.RegisterType
		}
		ret = resp
		return false
	})
	agents := len(asked.direct) + len(asked.pool)
	if !ret.Stopped && failure != "" {
		ret.Message = failure
	}
	if !ret.Stopped && owned && answered < agents && err == nil {
		ret.Message = fmt.Sprintf("still stopping: no nexlet confirmed the stop within %s", wait)
	}
	if !ret.Stopped && owned && agents > 0 && answered == agents && err == nil {
		// Every nexlet said it holds none: a stop confirmed a moment ago, not yet
		// forgotten (the memory is written before its reply, the state after).
		if e, ok := n.stopped.Get(workloadID, namespace, time.Now()); ok {
			return e.Answer(workloadID), nil
		}
	}
	if ret.Stopped && ret.AlreadyStoppedAt == "" {
		// Remembered before the reply, so a repeat never finds neither the workload
		// nor the memory. Its namespace: the one it was deployed in, else the
		// caller's (a nexlet checks it), else unknown (then only system sees it).
		ns := o.ns
		if ns == "" {
			ns = n.recordedLookup(workloadID)
		}
		if ns == "" && namespace != protocol.SystemNamespace {
			ns = namespace
		}
		typ := ret.WorkloadType
		if typ == "" {
			typ = o.typ
		}
		n.stopped.Add(workloadID, stopmemo.Entry{Namespace: ns, Name: o.name, Type: typ, How: ret.Message, At: time.Now()})
	}
	return ret, err
}

// stopAck arranges the node's "stopping" word (stopping, called once) for a stop of
// workload wid, owned as o, whose client does not wait for its end (nexctl workload
// stop --no-wait). It is said once the owning nexlet durably recorded the stop, so a
// kill of nexd or of the nexlet after the word neither leaves the workload running nor
// starts it again (e2e TestNoWaitStopSurvivesKillRightAfterAnswer; before, the word
// went out before the stop was even forwarded). ack takes a nexlet's word that it
// recorded it (askNexletsWith): only the owner's counts, known by its own reply
// subject, so no other nexlet can say it for it. The owner's silence is bounded
// (StopRecordTimeout): then the word says, naming the nexlet, that the stop is not
// confirmed recorded (HeaderStopUnrecorded), as it does at once when no nexlet of the
// owner is registered. A nexlet that cannot say it (upstream's SDK, which records no
// stop; a nexd SDK nexlet without nexlet.StopRecorder) gets the word as before, at
// once. settle ends the arrangement: after it nothing more is said. A stop the nexlet
// confirmed (stopped) before its word came (it could not write its record: a full
// runtime directory) is said then, plainly: the workload is gone, and the node's
// removal from its state, which may take seconds on a failing store, comes before the
// answer (TestEmbeddedStoreDiskFullHeals: before, a waiting nexctl heard nothing for
// 9 s and gave up with "not found").
func (n *Node) stopAck(wid string, o ownership, stopping func(nats.Header)) (ack func(*registration), settle func(stopped bool)) {
	var once sync.Once
	say := func(h nats.Header) { once.Do(func() { stopping(h) }) }
	hush := func(bool) { once.Do(func() {}) }
	n.mu.Lock()
	var holder *registration
	for _, r := range n.agents {
		if r.owner == o.owner {
			holder = r
			break
		}
	}
	n.mu.Unlock()
	switch {
	case holder == nil:
		say(nats.Header{protocol.HeaderStopUnrecorded: {fmt.Sprintf("nexlet %s is not registered (restarting?): it did not record the stop", o.owner)}})
		return nil, hush
	case !holder.req.AnswersDirect || !holder.req.StopAck:
		say(nil)
		return nil, hush
	}
	bound := n.o.StopRecordTimeout
	// The timer's function says and logs under once: after settle it does nothing, and
	// settle waits for one under way, so nothing of it outlives the stop.
	t := time.AfterFunc(bound, func() {
		once.Do(func() {
			n.log.Warn("a nexlet did not confirm it recorded a stop in time", "workload_id", wid, "nexlet", o.owner, "agent_id", holder.id, "wait", bound)
			stopping(nats.Header{protocol.HeaderStopUnrecorded: {fmt.Sprintf("nexlet %s (agent %s) did not confirm within %s that it recorded the stop", o.owner, holder.id, bound)}})
		})
	})
	ack = func(from *registration) {
		if from.owner != o.owner {
			return // another nexlet's word for a workload it does not hold
		}
		say(nats.Header{protocol.HeaderStopRecorded: {o.owner}})
	}
	return ack, func(stopped bool) {
		t.Stop()
		if stopped {
			say(nil)
		}
		hush(stopped) // waits for a word being said: it goes before the answer
	}
}

// owns says whether the workload was deployed or replayed through this node.
// placedInAnother reports whether the node placed workloadID (in this run, in a deploy
// in flight, or as node state records it) in a namespace other than ns, a tenant's.
// It does what stopWorkloadSaying does first for an id the node does not hold, read
// node state's namespaces, so that both take the same time.
func (n *Node) placedInAnother(ctx context.Context, ns, workloadID string) bool {
	if ns == protocol.SystemNamespace {
		return false
	}
	recorded, err := n.recordedNamespace(ctx, workloadID)
	if err != nil {
		return false // stopWorkloadSaying reads again and refuses (errStateUnread)
	}
	n.mu.Lock()
	o, owned := n.owned[workloadID]
	st, starting := n.starting[workloadID]
	n.mu.Unlock()
	placed := recorded
	switch {
	case owned:
		placed = o.ns
	case starting:
		placed = st.ns
	}
	return placed != "" && placed != ns
}

func (n *Node) owns(workloadID string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.owned[workloadID]
	return ok
}

// handleUndeploy answers once the workload is gone. For a workload it owns, and when
// the caller asked for it (HeaderProgress on the request; upstream clients take the
// first reply as the answer and do not), the node first says it is stopping (a reply
// with HeaderProgress and no body), so a client that does not want to wait, or that
// gathers from many nodes, knows which node will answer.
func (n *Node) handleUndeploy(r micro.Request) {
	st := steps.Start(n.log) // nil unless the node logs at debug level
	workloadID := protocol.Token(r.Subject(), 5)
	// Every answer names the node, its errors too: a client waiting for the holder's
	// answer (after its word, or as the listing named it) takes a failure there for
	// that answer, not for one of the other nodes' (TestStopFailureNamesNode).
	named := micro.WithHeaders(micro.Headers{protocol.HeaderNode: {n.id}})
	var req protocol.StopWorkloadRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad stop workload request", err, named)
		return
	}
	if _, ok := n.checkNamespace(r, req.Namespace); !ok {
		return
	}
	var stopping func(nats.Header)
	if r.Reply() != "" && r.Headers().Get(protocol.HeaderProgress) != "" {
		stopping = func(h nats.Header) {
			m := &nats.Msg{Subject: r.Reply(), Header: nats.Header{protocol.HeaderProgress: {"stopping"}, protocol.HeaderNode: {n.id}}}
			for k, v := range h {
				m.Header[k] = v
			}
			n.signReply(r, m)
			if err := n.o.NC.PublishMsg(m); err != nil {
				n.log.Warn("failed to say a workload is stopping", "workload_id", workloadID, "err", err)
			}
		}
	}
	st.Step("check") // decode, namespace
	if testhold.Holds(n.o.TestHold, testhold.StopLate) && n.owns(workloadID) {
		// A loaded node: its word comes after the other nodes' "not found".
		n.log.Warn("test hold: a stop of an owned workload waits until released", "workload_id", workloadID, "hold", testhold.StopLate)
		released := testhold.Released(n.ctx, n.o.TestHold, testhold.StopLate, testhold.StopLateMax)
		n.log.Warn("test hold: the stop of an owned workload goes on", "workload_id", workloadID, "hold", testhold.StopLate, "released", released)
	}
	_, detached := unwrapRequest(r).(*detachedRequest) // on a request goroutine of the node's (async)
	target := workloadID
	if n.placedInAnother(n.ctx, req.Namespace, workloadID) {
		// Another namespace's workload: not found, as for an id the node does not
		// hold, and after the same work, asking the nexlets to stop an id that is no
		// workload's: answered at once, a stop told a tenant which node held an id it
		// knew by coming about one round trip sooner (TestStopTimingTellsNoHeldID).
		// The workload's own nexlet is not asked about it, nor is anything removed.
		target = randid.New()
	}
	resp, err := n.stopWorkloadSaying(n.ctx, req.Namespace, target, stopping, detached)
	if target != workloadID {
		// Not found, whatever a nexlet said of an id it cannot hold (upstream's lax
		// nexlet answers any unknown id stopped: see Known limitations).
		resp = protocol.StopWorkloadResponse{ID: workloadID, Message: protocol.ErrTextWorkloadNotFound}
	}
	if errors.Is(err, errStateUnread) {
		// Whose workload it is cannot be told yet: nothing is asked or removed.
		n.fail(r, 503, "cannot stop a workload yet: its namespace is unknown until node state is read", err, named)
		return
	}
	if err != nil {
		n.fail(r, 500, "failed to ask nexlets to stop a workload", err, named)
		return
	}
	st.Step("nexlet") // to the nexlet and back: it answers once the workload is gone
	fromMemory := resp.AlreadyStoppedAt != "" && !n.owns(workloadID)
	if resp.Stopped && !fromMemory {
		// Out of node state before the answer: a stop that was answered stays
		// stopped. Before, the state record went after the reply, and a nexd killed
		// in between replayed the stopped service at its next start, which ran it
		// again (TestAnsweredStopStaysStoppedAcrossKills).
		if err := n.unstore(workloadID, resp.WorkloadType); err != nil {
			// Stopped all the same; the caller is told whether it stays so.
			resp.StateRemoval = protocol.StateRemovalFailed
			how := "it may be started again when nexd or its nexlet restarts"
			if errors.Is(err, ErrRemovalPending) {
				resp.StateRemoval = protocol.StateRemovalPending
				how = "a tombstone on this node keeps it from being started again until a retried removal succeeds"
			}
			cause := strings.TrimPrefix(err.Error(), ErrRemovalPending.Error()+": ")
			resp.Message += fmt.Sprintf("; removing it from node state failed (%s): %s", cause, how)
		}
		st.Step("unstore")
	}
	// Named, so a client that knows which node holds the workload waits for its
	// answer and not only for the first "not found" of the others (nexctl's migrate).
	if err := r.RespondJSON(resp, named); err != nil {
		n.log.Warn("failed to send reply", "subject", r.Subject(), "err", err)
	}
	st.Step("reply")
	if fromMemory {
		n.log.Info("workload already stopped", "workload_id", workloadID, "namespace", req.Namespace, "stopped_at", resp.AlreadyStoppedAt)
		if n.o.Observer != nil {
			n.o.Observer.Stop(StopAlreadyStopped)
		}
		return // answered from memory: nothing was stopped or is left to forget
	}
	if testhold.Holds(n.o.TestHold, testhold.StopReplied) {
		n.log.Warn("test hold: a stop answered, its workload not forgotten yet", "workload_id", workloadID, "hold", testhold.StopReplied)
		<-n.ctx.Done()
	}
	if n.o.Observer != nil {
		outcome := StopNotFound
		if resp.Stopped {
			outcome = StopStopped
		}
		n.o.Observer.Stop(outcome)
	}
	if resp.Stopped {
		n.log.Info("workload stopped", "workload_id", workloadID, "namespace", req.Namespace, "type", resp.WorkloadType, "how", resp.Message)
		n.forgetStored(workloadID)
		st.Step("forget") // after the reply: ownership, the workload's NATS user revoked
		st.Log(n.log, "stop steps", "workload_id", workloadID)
	}
}

func (n *Node) handleClone(r micro.Request) {
	workloadID := protocol.Token(r.Subject(), 5)
	var req protocol.CloneWorkloadRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad clone workload request", err)
		return
	}
	ns, ok := n.checkNamespace(r, req.Namespace)
	if !ok {
		return
	}
	if req.NewTargetXKey != "" {
		// Re-seal only to a nexlet a node vouched for in a signed bid: anyone who may
		// clone could otherwise read the environment by naming a key of their own.
		var err error
		switch {
		case req.Bid == nil:
			err = errors.New("no signed bid (nexd_bid) names it")
		case req.Bid.XKey != req.NewTargetXKey:
			err = fmt.Errorf("the bid names xkey %s", req.Bid.XKey)
		case len(n.o.TrustedNodes) > 0 && !slices.Contains(n.o.TrustedNodes, req.Bid.NodeID):
			err = fmt.Errorf("node %s is not in trusted_nodes", req.Bid.NodeID)
		default:
			err = protocol.VerifyBid(req.BidNamespace, req.BidAuctionID, *req.Bid)
		}
		if err != nil {
			n.log.Info("clone: not re-sealing to the requested xkey", "workload_id", workloadID, "xkey", req.NewTargetXKey, "reason", err.Error())
			req.NewTargetXKey = ""
		}
	}
	// Nexlets get upstream's request, never the bid.
	body, err := protocol.Marshal(protocol.CloneWorkloadRequest{Namespace: req.Namespace, NewTargetXKey: req.NewTargetXKey})
	if err != nil {
		n.fail(r, 500, "failed to encode clone request", err)
		return
	}
	n.mu.Lock()
	o, owned := n.owned[workloadID]
	n.mu.Unlock()
	if !owned {
		// Only the nexlet this node gave the workload speaks for it: a clone's answer
		// is a start request the client may deploy as its own. Upstream relayed any
		// nexlet's, so a rogue one could answer for any workload on any node.
		return
	}
	if ns != protocol.SystemNamespace && o.ns != "" && o.ns != ns {
		// Another namespace's workload, as the node placed it: silence, as if absent,
		// and its nexlet is not asked. A nexlet that fills in the namespace from the
		// request answered it as the caller's, and the node passed another tenant's
		// start request on (TestAttackTenantClonesAnothersWorkloadOnLaxNexlet).
		return
	}
	var found []byte
	_, err = n.askNexlets(n.ctx, protocol.GetWorkloadSubject(n.id, workloadID), func(id string) string {
		return protocol.GetWorkloadAgentSubject(n.id, id, workloadID)
	}, body, n.o.CloneTimeout, func(m *nats.Msg, from *registration) bool {
		var swr protocol.StartWorkloadRequest
		if isErrorReply(m) || protocol.Decode(m.Data, &swr) != nil {
			return true
		}
		if !n.speaksFor(workloadID, from, "clone answer") {
			return true
		}
		// A nexlet looks the id up in every namespace; only system may see
		// another namespace's workload, and others hear silence, as if absent.
		if swr.Namespace != ns && ns != protocol.SystemNamespace {
			return true
		}
		found = m.Data
		return false
	})
	if err != nil {
		n.log.Warn("clone fan-out", "workload_id", workloadID, "err", err)
	}
	if found == nil {
		return
	}
	// Named: the node holding the workload, whose stop answer a clone --stop waits for.
	if err := r.Respond(found, micro.WithHeaders(micro.Headers{protocol.HeaderNode: {n.id}})); err != nil {
		n.log.Warn("failed to send reply", "subject", r.Subject(), "err", err)
	}
}

// queryWorkloads fans QUERYWORKLOADS out and concatenates the answers. missing names
// the nexlets whose workloads the list lacks: those that did not answer within the
// fan-out's bound (busy, restarting) or answered with an error.
func (n *Node) queryWorkloads(ctx context.Context, req protocol.AgentListWorkloadsRequest) (out []protocol.WorkloadSummary, missing []protocol.MissingNexlet, err error) {
	if req.Filter == nil {
		req.Filter = []string{}
	}
	body, err := protocol.Marshal(req)
	if err != nil {
		return nil, nil, err
	}
	out = []protocol.WorkloadSummary{}
	n.mu.Lock()
	drained := n.drained
	n.mu.Unlock()
	if drained {
		// Deploys are refused in lame duck and the drain stopped every workload of a
		// whole list: the answer is empty and whole. Asked of nexlets that are being
		// stopped with the node, it would come back partial, and nexctl lameduck
		// --wait would report the node not drained.
		return out, nil, nil
	}
	var waited time.Duration
	if req.Namespace != protocol.SystemNamespace {
		// Rows count in the namespace node state gave their workloads: the start's
		// read of it, if still under way, is waited for (rowNamespaceLocked).
		waited = n.awaitRecorded(ctx, n.o.FanoutTimeout/2)
	}
	waited += n.awaitServing(ctx, n.o.FanoutTimeout/2-waited)
	ans := answers{failed: map[string]string{}, heard: map[string]bool{}}
	asked, err := n.askNexletsWith(ctx, protocol.QueryWorkloadsSubject(n.id), func(id string) string {
		return protocol.QueryWorkloadsAgentSubject(n.id, id)
	}, body, n.o.FanoutTimeout-waited, askOpts{listParts: true, listNS: req.Namespace}, func(m *nats.Msg, from *registration) bool {
		var list []protocol.WorkloadSummary
		failure := ""
		if isErrorReply(m) {
			failure = fmt.Sprintf("%s (code %s)", m.Header.Get(protocol.HeaderError), m.Header.Get(protocol.HeaderErrorCode))
		} else if err := jsonArray(m.Data, &list); err != nil {
			failure = "a list that does not decode: " + err.Error()
		}
		ans.add(from, failure)
		if failure != "" {
			return true
		}
		n.mu.Lock()
		defer n.mu.Unlock()
		for _, w := range list {
			// Defence in depth: never show another namespace's workload to a
			// non-system caller, even if a nexlet would. The namespace the node
			// placed the workload in counts, not the row's, which is optional in
			// upstream's summary: a row without one passed, and a nexlet that lists
			// whatever it holds showed every tenant the others' workloads
			// (TestAttackTenantListsAnothersWorkloadOnLaxNexlet). A row of unknown
			// namespace (not placed by this node, none in the row) is system's only.
			if req.Namespace != protocol.SystemNamespace && n.rowNamespaceLocked(w) != req.Namespace {
				continue
			}
			if !n.speaksForLocked(w.ID, from) {
				n.log.Warn("dropped a listed workload: another nexlet runs it", "workload_id", w.ID, "agent_id", agentIDOf(from))
				continue
			}
			out = append(out, w)
		}
		return true
	})
	return out, ans.missing(asked, n.o.FanoutTimeout), err
}

// rowNamespaceLocked is the namespace a listed workload counts in: the one the node
// placed it in (deployed or replayed), else the row's, else "" (unknown). n.mu is held.
func (n *Node) rowNamespaceLocked(w protocol.WorkloadSummary) string {
	if o, ok := n.owned[w.ID]; ok && o.ns != "" {
		return o.ns
	}
	if ns := n.recordedLookup(w.ID); ns != "" {
		return ns // node state's, before its nexlet registered again
	}
	if w.Namespace != nil {
		return *w.Namespace
	}
	return ""
}

// speaksForLocked reports whether a reply from `from` (nil: one on the shared subject)
// may speak for workload wid. A workload this node gave a nexlet is spoken for by that
// nexlet's answer on its own reply subject only, or, when that nexlet is registered and
// asked on the shared subject (upstream's SDK), by an answer there: a rogue nexlet
// neither lists nor stops nor clones another's.
func (n *Node) speaksForLocked(wid string, from *registration) bool {
	o, ok := n.owned[wid]
	if !ok {
		return true
	}
	if from != nil {
		return from.owner == o.owner
	}
	// An answer on the shared subject may be any nexlet's there: it speaks for the
	// workload only while a nexlet of its owner is asked there. With none registered
	// (its nexlet crashed, and its successor takes the workload back), nobody does.
	for _, r := range n.agents {
		if r.owner == o.owner && !r.req.AnswersDirect {
			return true
		}
	}
	return false
}

// ownerReturnWait bounds how long a stop waits for the nexlet that runs its workload to
// be registered again: the supervisor's longest restart backoff (30 s) and a start.
const ownerReturnWait = time.Minute

// awaitOwner waits, up to bound, until the nexlet instance owner is registered and
// serving (its first heartbeat, or servingAfter since its registration, as
// awaitServing), and reports whether it is.
func (n *Node) awaitOwner(ctx context.Context, owner string, bound time.Duration) bool {
	timer := time.NewTimer(bound)
	defer timer.Stop()
	for {
		n.mu.Lock()
		serving := n.ownerServingLocked(owner)
		ch := n.changed
		n.mu.Unlock()
		if serving {
			return true
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		case <-timer.C:
			return false
		}
	}
}

// ownerServing reports whether the nexlet instance owner is registered and serving.
func (n *Node) ownerServing(owner string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ownerServingLocked(owner)
}

// ownerServingLocked is ownerServing with n.mu held: registered, and its first
// heartbeat came or servingAfter passed since its registration (as awaitServing).
func (n *Node) ownerServingLocked(owner string) bool {
	for _, r := range n.agents {
		if r.owner == owner && (!r.lastBeat.IsZero() || time.Since(r.registeredAt) >= servingAfter) {
			return true
		}
	}
	return false
}

// servingAfter bounds how long after its registration a nexlet that has not sent a
// heartbeat yet is awaited by a list (awaitServing): one that never sends one is not
// awaited for ever.
const servingAfter = 10 * time.Second

// awaitServing waits, up to bound, until every nexlet that registered lately has sent
// its first heartbeat, and returns how long it waited. A nexlet's registration is
// accepted before it serves its endpoints: it connects with the credentials of the
// reply, subscribes them, then sends its first heartbeat. A QUERYWORKLOADS sent in
// between reaches no one, and a list asked right after a nexlet's restart came back
// partial at once ("no answer within 2s" after 1 ms; e2e TestListDuringReplayIsWhole:
// 16 of 23 lists). Lists during the replay that follows answer whole.
func (n *Node) awaitServing(ctx context.Context, bound time.Duration) time.Duration {
	start := time.Now()
	timer := time.NewTimer(bound)
	defer timer.Stop()
	// Logged (debug) when it waits and when its bound passes: e2e
	// TestListDuringReplayIsWhole counts by them that its list met a nexlet not serving.
	logged := false
	for {
		n.mu.Lock()
		pending := ""
		for _, r := range n.agents {
			if r.lastBeat.IsZero() && time.Since(r.registeredAt) < servingAfter {
				pending = r.id
				break
			}
		}
		ch := n.changed
		n.mu.Unlock()
		if pending == "" {
			return time.Since(start)
		}
		if !logged {
			n.log.Debug("a list waits for a nexlet registered and not serving yet", "agent_id", pending, "bound", bound)
			logged = true
		}
		select {
		case <-ch:
			continue
		case <-ctx.Done():
		case <-timer.C:
			n.log.Debug("a list waited its bound for a nexlet not serving yet, asks without it", "agent_id", pending, "bound", bound)
		}
		return time.Since(start)
	}
}

// speaksFor is speaksForLocked, logging a refused answer (what it was).
func (n *Node) speaksFor(wid string, from *registration, what string) bool {
	n.mu.Lock()
	ok := n.speaksForLocked(wid, from)
	n.mu.Unlock()
	if !ok {
		n.log.Warn("ignored a nexlet's answer: another nexlet runs the workload", "answer", what, "workload_id", wid, "agent_id", agentIDOf(from))
	}
	return ok
}

// agentIDOf is from's agent id, "" for a reply on the shared subject.
func agentIDOf(from *registration) string {
	if from == nil {
		return ""
	}
	return from.id
}

// answers tells which nexlets answered a fan-out: those asked on their own subjects by
// the reply subject they answered on; those asked on the shared subject (upstream's
// SDK) only by count, since any nexlet may answer there under any name.
type answers struct {
	heard    map[string]bool   // direct nexlets that answered, by agent id
	failed   map[string]string // direct nexlet's agent id -> its error reply
	pool     int               // replies on the shared subject
	poolFail []string          // their errors
}

func (a *answers) add(from *registration, failure string) {
	if from == nil {
		a.pool++
		if failure != "" {
			a.poolFail = append(a.poolFail, failure)
		}
		return
	}
	a.heard[from.id] = true
	if failure != "" {
		a.failed[from.id] = failure
	}
}

// missing lists the nexlets asked whose workloads the answers lack, sorted by name. A
// nexlet asked on its own subject is missing unless it answered there without an error.
// Replies on the shared subject may be any of the nexlets asked there: when as many came
// as were asked, and none was an error, none of those is missing; otherwise each is
// listed, and when some replies came it is not known which ones are missing (maybe).
func (a *answers) missing(asked asked, wait time.Duration) []protocol.MissingNexlet {
	var out []protocol.MissingNexlet
	for id, r := range asked.direct {
		switch reason, failed := a.failed[id]; {
		case failed:
			out = append(out, protocol.MissingNexlet{ID: id, Name: r.req.Name, Reason: "answered with an error: " + reason})
		case !a.heard[id]:
			out = append(out, protocol.MissingNexlet{ID: id, Name: r.req.Name, Reason: fmt.Sprintf("no answer within %s", wait)})
		}
	}
	if a.pool < len(asked.pool) || len(a.poolFail) > 0 {
		reason := fmt.Sprintf("no answer within %s", wait)
		if len(a.poolFail) > 0 {
			reason = "answered with an error: " + strings.Join(a.poolFail, "; ")
			if a.pool < len(asked.pool) {
				reason = fmt.Sprintf("no answer within %s, or answered with an error: %s", wait, strings.Join(a.poolFail, "; "))
			}
		}
		for id, r := range asked.pool {
			out = append(out, protocol.MissingNexlet{ID: id, Name: r.req.Name, Reason: reason, Maybe: len(asked.pool) > 1 && a.pool > 0})
		}
	}
	slices.SortFunc(out, func(x, y protocol.MissingNexlet) int { return strings.Compare(x.Name+x.ID, y.Name+y.ID) })
	return out
}

func jsonArray(data []byte, list *[]protocol.WorkloadSummary) error {
	if bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
		return nil
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return err
	}
	for _, item := range raw {
		var w protocol.WorkloadSummary
		if err := protocol.Decode(item, &w); err != nil {
			return err
		}
		*list = append(*list, w)
	}
	return nil
}

func (n *Node) handleWPing(r micro.Request) {
	var req protocol.AgentListWorkloadsRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad list workloads request", err)
		return
	}
	ns, ok := n.checkNamespace(r, req.Namespace)
	if !ok {
		return
	}
	if ns != protocol.SystemNamespace {
		req.Namespace = ns
	}
	if r.Reply() != "" && r.Headers().Get(protocol.HeaderProgress) != "" {
		// The client asked: say at once that this node answers (after up to its 2 s
		// fan-out), so a gather across nodes waits for it and does not end with the
		// faster nodes' answers.
		m := &nats.Msg{Subject: r.Reply(), Header: nats.Header{protocol.HeaderProgress: {"listing"}, protocol.HeaderNode: {n.id}}}
		n.signReply(r, m)
		if err := n.o.NC.PublishMsg(m); err != nil {
			n.log.Warn("failed to acknowledge a workload list request", "err", err)
		}
	}
	list, missing, err := n.queryWorkloads(n.ctx, req)
	if err != nil {
		n.fail(r, 500, "failed to ask nexlets for workloads", err)
		return
	}
	head := micro.Headers{protocol.HeaderNode: {n.id}}
	if len(missing) > 0 {
		full := protocol.PartialList{NodeName: n.o.Name, Wait: n.o.FanoutTimeout.String(), Missing: missing, MissingCount: len(missing)}
		p, _ := json.Marshal(full)
		n.log.Warn("workload list partial: nexlets missing from it", "namespace", ns, "missing", string(p))
		if ns != protocol.SystemNamespace {
			// The node's nexlets (ids, names, their errors' text) are its operator's:
			// another namespace learns that its list is partial and by how many
			// nexlets, not which (TestPartialListTenantLearnsNoNexlets).
			full.Missing = nil
			p, _ = json.Marshal(full)
		}
		head[protocol.HeaderPartial] = []string{string(p)}
	}
	if ref := r.Headers().Get(protocol.HeaderStoppedRef); ref != "" {
		// The stop memory's rule: the caller's namespace only, every one from system
		// (TestRecentStopsStayInTheirNamespace).
		var rs []protocol.RecentStop
		for _, m := range n.stopped.Find(ref, ns, time.Now(), 16) {
			rs = append(rs, protocol.RecentStop{ID: m.ID, Name: m.Name, Namespace: m.Namespace, StoppedAt: m.At.UTC().Format(time.RFC3339)})
		}
		if len(rs) > 0 {
			b, _ := json.Marshal(rs)
			head[protocol.HeaderStopped] = []string{string(b)}
		}
	}
	if want := r.Headers().Get(protocol.HeaderResources); (want == n.id || want == "*") && n.o.WorkloadResources != nil {
		// Only a workload the node placed: a row's id is the nexlet's word, and the
		// reader joins it under the workloads' cgroup directory, so a rogue nexlet's
		// row ".." read the figures of nexd's whole tree for its tenant
		// (TestAttackListedIDReachesResourceReader).
		for i := range list {
			if !n.owns(list[i].ID) {
				continue
			}
			if res, ok := n.o.WorkloadResources(list[i].ID); ok {
				list[i].Resources = &res
			}
		}
	}
	body, err := json.Marshal(list)
	if err != nil {
		n.fail(r, 500, "failed to encode the workload list", err)
		return
	}
	// Upstream's WPING answer is one array a node. One over max_payload cannot be sent:
	// the client heard nothing from this node and nexctl printed "No workloads found",
	// exit 0. An error says what happened instead.
	if limit := n.o.NC.MaxPayload() - headerBytes(head) - wpingHeadroom; int64(len(body)) > limit {
		n.fail(r, 413, "workload list too large", fmt.Errorf("this node's list of %d workloads is %d bytes, over the %d one NATS message may carry (max_payload); list them on the node: nexctl workloads",
			len(list), len(body), limit), micro.WithHeaders(micro.Headers{protocol.HeaderNode: {n.id}}))
		return
	}
	if err := r.Respond(body, micro.WithHeaders(head)); err != nil {
		n.log.Warn("failed to send reply", "subject", r.Subject(), "err", err)
	}
}

// wpingHeadroom is what a WPING answer leaves of max_payload for the status line and
// the headers' framing, beyond their keys and values (headerBytes).
const wpingHeadroom = 1024

// headerBytes is the size of h's keys and values.
func headerBytes(h micro.Headers) int64 {
	var size int64
	for k, vs := range h {
		for _, v := range vs {
			size += int64(len(k) + len(v) + 4)
		}
	}
	return size
}

// Workloads lists every workload on this node (for the local control socket).
func (n *Node) Workloads(ctx context.Context) ([]protocol.WorkloadSummary, error) {
	list, _, err := n.WorkloadList(ctx)
	return list, err
}

// WorkloadList is Workloads with the nexlets whose workloads the list lacks: they did
// not answer within the fan-out's wait (FanoutTimeout), or answered with an error.
func (n *Node) WorkloadList(ctx context.Context) ([]protocol.WorkloadSummary, []protocol.MissingNexlet, error) {
	connected := n.o.NC.IsConnected()
	list, missing, err := n.queryWorkloads(ctx, protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace})
	// Only a whole answer asked and received while connected throughout is kept: one
	// sent into the reconnect buffer times out empty and would say the node runs
	// nothing.
	if err == nil && len(missing) == 0 && connected && n.o.NC.IsConnected() {
		n.mu.Lock()
		n.lastList, n.lastListAt = slices.Clone(list), time.Now()
		n.mu.Unlock()
	}
	return list, missing, err
}

// FanoutWait is how long the node waits for its nexlets' answers to a fan-out.
func (n *Node) FanoutWait() time.Duration { return n.o.FanoutTimeout }

// KnownWorkloads is Workloads for status and metrics: while the node's NATS
// connection is down the nexlets cannot be asked (their workloads run on), so it
// returns the last listing taken while connected and when it was taken (zero when
// the list is fresh; the list is empty if none was ever taken).
func (n *Node) KnownWorkloads(ctx context.Context) ([]protocol.WorkloadSummary, time.Time, error) {
	if n.o.NC.IsConnected() {
		list, err := n.Workloads(ctx)
		if err != nil || n.o.NC.IsConnected() {
			return list, time.Time{}, err
		}
		// The connection dropped while asking: the answer may be short.
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	at := n.lastListAt
	if at.IsZero() {
		at = n.startTime
	}
	return slices.Clone(n.lastList), at, nil
}

// StopAllWorkloads stops every workload on this node through its nexlets (node
// shutdown), all at once, each waited for. Node state is left alone from here on, so
// the workloads come back when the nexlets register again after a restart. As in
// DrainWorkloads, a partial list (a nexlet that missed the fan-out) is asked again
// after the stops and its new rows stopped; a list still partial then is an error
// naming the missing nexlets, whose workloads may run on (TestStopAllPartialList).
func (n *Node) StopAllWorkloads(ctx context.Context) error {
	n.mu.Lock()
	n.keep = true
	n.mu.Unlock()
	var errs []error
	done := map[string]bool{}
	var stopped atomic.Int64
	for round := 0; ; round++ {
		list, missing, err := n.WorkloadList(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("list workloads to stop: %w", err))
			break
		}
		targets, names := make(map[string]string, len(list)), make(map[string]string, len(list))
		for _, w := range list {
			targets[w.ID], names[w.ID] = listedNamespace(w), w.Name
		}
		errs = append(errs, n.stopEach(ctx, targets, done, func(id string, resp protocol.StopWorkloadResponse, err error) error {
			switch {
			case err != nil:
				return fmt.Errorf("stop workload %s (%s): %w", id, names[id], err)
			case !resp.Stopped:
				return fmt.Errorf("stop workload %s (%s): %s", id, names[id], resp.Message)
			}
			stopped.Add(1)
			return nil
		})...)
		if len(missing) == 0 {
			break
		}
		if round == 0 {
			continue
		}
		errs = append(errs, errors.New("the list is partial; missing those of "+protocol.MissingText(missing)+": their workloads may run on"))
		break
	}
	err := errors.Join(errs...)
	if err != nil {
		n.log.Error("stopping workloads at shutdown", "stopped", stopped.Load(), "errors", len(errs), "err", err)
	} else {
		n.log.Info("workloads stopped at shutdown", "stopped", stopped.Load())
	}
	return err
}

// listedNamespace is the namespace a listed workload is stopped in.
func listedNamespace(w protocol.WorkloadSummary) string {
	if w.Namespace != nil && *w.Namespace != "" {
		return *w.Namespace
	}
	return protocol.SystemNamespace
}

// stopEach stops, all at once, each workload of targets (id → namespace) not yet done,
// and marks it done. after is called (concurrently) with each stop's outcome; the
// errors it returns are returned.
func (n *Node) stopEach(ctx context.Context, targets map[string]string, done map[string]bool,
	after func(id string, resp protocol.StopWorkloadResponse, err error) error) []error {
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	for id, ns := range targets {
		if done[id] {
			continue
		}
		done[id] = true
		wg.Go(func() {
			resp, err := n.stopWorkload(ctx, ns, id)
			if err := after(id, resp, err); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return errs
}

// DrainWorkloads is the end of lame duck mode: it stops every workload this node runs
// or holds in state, all at once, each waited for until it is gone (its grace, then a
// kill), and removes each from node state whatever the timing: whether the nexlet
// stopped it first on its own lame duck timer, the node's stop did, or it was already
// gone. A workload no nexlet confirmed stopping is removed too: the node is going away.
// A partial list (a nexlet that did not answer) is asked again after the stops, which
// may have waited for that nexlet, and its new rows stopped; a list still partial then
// is one of the drain's errors, since workloads this node does not own may run on. A
// stopped workload whose removal from node state failed is one too, and is named in
// the result's RemovalFailures. Deploys the node took before its lame duck began and
// still in flight are waited for first (each within its own bounds), so what they
// start is among the workloads stopped.
func (n *Node) DrainWorkloads(ctx context.Context) (DrainResult, error) {
	var res DrainResult
	var resMu sync.Mutex // the stops' callbacks run concurrently
	n.waitDeploysInFlight(ctx)
	targets := map[string]drainTarget{}
	n.mu.Lock()
	for id, o := range n.owned {
		targets[id] = drainTarget{ns: protocol.SystemNamespace, typ: o.typ}
	}
	n.mu.Unlock()
	var errs []error
	done := map[string]bool{}
	for round := 0; ; round++ {
		list, missing, listErr := n.WorkloadList(ctx)
		for _, w := range list {
			t := targets[w.ID]
			t.ns = listedNamespace(w)
			if t.typ == "" {
				t.typ = w.WorkloadType
			}
			targets[w.ID] = t
		}
		nss := make(map[string]string, len(targets))
		for id, t := range targets {
			nss[id] = t.ns
		}
		errs = append(errs, n.stopEach(ctx, nss, done, func(id string, resp protocol.StopWorkloadResponse, err error) error {
			if err == nil && !resp.Stopped && resp.Message != protocol.ErrTextWorkloadNotFound {
				err = errors.New(resp.Message)
			}
			rerr := n.forget(id, targets[id].typ)
			if rerr != nil {
				resMu.Lock()
				res.RemovalFailures = append(res.RemovalFailures, RemovalFailure{WorkloadID: id, Pending: errors.Is(rerr, ErrRemovalPending), Err: rerr})
				resMu.Unlock()
			}
			switch {
			case err != nil && rerr != nil:
				return fmt.Errorf("drain workload %s: %w; removing it from node state failed: %w", id, err, rerr)
			case err != nil:
				return fmt.Errorf("drain workload %s: %w", id, err)
			case rerr != nil:
				return fmt.Errorf("drain workload %s: stopped, but removing it from node state failed: %w", id, rerr)
			}
			return nil
		})...)
		if listErr == nil && len(missing) > 0 {
			if round == 0 {
				continue
			}
			// Their workloads this node does not own are not among the targets.
			listErr = errors.New("the list is partial; missing those of " + protocol.MissingText(missing))
		}
		if listErr != nil {
			errs = append(errs, fmt.Errorf("list workloads to drain: %w", listErr))
		}
		break
	}
	res.Workloads = len(targets)
	slices.SortFunc(res.RemovalFailures, func(a, b RemovalFailure) int { return strings.Compare(a.WorkloadID, b.WorkloadID) })
	if len(res.RemovalFailures) > 0 {
		ids := make([]string, 0, len(res.RemovalFailures))
		pending := 0
		for _, f := range res.RemovalFailures {
			ids = append(ids, f.WorkloadID)
			if f.Pending {
				pending++
			}
		}
		n.log.Warn("lame duck drain: stopped workloads not removed from node state", "count", len(ids), "workload_ids", ids,
			"tombstoned", pending)
	}
	n.log.Info("lame duck drain done", "workloads", len(targets), "errors", len(errs), "removal_failures", len(res.RemovalFailures))
	err := errors.Join(errs...)
	if err == nil {
		n.mu.Lock()
		n.drained = true
		n.mu.Unlock()
		n.tellDrain(protocol.DrainDrained, "")
	} else {
		n.tellDrain(protocol.DrainFailed, err.Error())
	}
	return res, err
}

// waitDeploysInFlight returns once no deploy is in flight (or ctx ended). In lame duck
// mode the node reserves no new deploy, so those in flight only end: each once its
// nexlet answered or the node gave up on it (StartTimeout, DeployTimeout), committed
// (owned, so drained) or rolled back. Before, a drain listed and stopped what was owned
// or listed at that moment: a nexlet that holds a workload only once it answered its
// start (an SDK nexlet pulling an image) started it after the drain, where it ran on
// and stayed in node state, to be started again by the next nexd
// (TestDrainWaitsForDeploysInFlight).
func (n *Node) waitDeploysInFlight(ctx context.Context) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	said := false
	for {
		n.mu.Lock()
		left := len(n.starting)
		n.mu.Unlock()
		if left == 0 {
			return
		}
		if !said {
			said = true
			n.log.Info("lame duck drain: waiting for the deploys in flight to be answered", "deploys", left)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// DrainResult is what DrainWorkloads did.
type DrainResult struct {
	// Workloads counts those it stopped (or found gone): held in state or listed.
	Workloads int
	// RemovalFailures are the stopped workloads whose removal from node state failed,
	// by id.
	RemovalFailures []RemovalFailure
}

// RemovalFailure is a drained workload whose removal from node state failed.
type RemovalFailure struct {
	WorkloadID string
	// Pending: a tombstone stands in (ErrRemovalPending): no replay starts the workload
	// again, and a retry removes it. Else it may be started again when nexd or its
	// nexlet restarts.
	Pending bool
	Err     error
}

// drainTarget is a workload DrainWorkloads stops.
type drainTarget struct{ ns, typ string }

// forget removes a workload that ended from the node state, and returns unstore's
// error (logged there; a tombstone, if any, stands in).
func (n *Node) forget(workloadID, workloadType string) error {
	err := n.unstore(workloadID, workloadType)
	n.forgetStored(workloadID)
	return err
}

// unstore removes a workload from node state (its type: workloadType, else the one it
// was deployed with; unknown, nothing is removed). The error (logged here) wraps
// ErrRemovalPending when a tombstone stands in for the removal.
func (n *Node) unstore(workloadID, workloadType string) error {
	n.mu.Lock()
	o, ok := n.owned[workloadID]
	if ok && workloadType == "" {
		workloadType = o.typ
	}
	n.mu.Unlock()
	if workloadType == "" {
		return nil
	}
	if !ok {
		n.awaitRecorded(n.ctx, n.o.FanoutTimeout) // the start's read, if under way
		o.ns = n.recordedLookup(workloadID)       // a tombstone keeps its namespace
	}
	err := n.o.Store.Delete(withNamespace(n.ctx, o.ns), workloadType, workloadID)
	if errors.Is(err, ErrRemovalPending) {
		n.log.Warn("failed to remove an ended workload from node state; a tombstone stands in for it", "workload_id", workloadID, "err", err)
	} else if err != nil {
		n.log.Error("failed to remove an ended workload from node state; it may be replayed", "workload_id", workloadID, "err", err)
	}
	return err
}

// forgetStored is the rest of forget once unstore removed the workload from node state.
func (n *Node) forgetStored(workloadID string) {
	defer n.changes.Add(1)
	n.mu.Lock()
	if o, ok := n.owned[workloadID]; ok {
		n.feeds.ended(workloadID, o.owner, o.ns, time.Now())
	}
	delete(n.owned, workloadID)
	delete(n.renewed, workloadID)
	n.mu.Unlock()
	n.forgetRecorded(workloadID)
	if n.o.Observer != nil {
		n.o.Observer.WorkloadEnded(workloadID)
	}
}

// onWorkloadStopped handles $NEX.FEED.<ns>.events.WORKLOADSTOPPED: a nexlet says a
// workload ended (job done, service given up, stopped). Only workloads this node
// stored are touched, and none once StopAllWorkloads ran (shutdown keeps state).
func (n *Node) onWorkloadStopped(m *nats.Msg) {
	defer n.changes.Add(1)
	var ev protocol.WorkloadStoppedEvent
	if err := json.Unmarshal(m.Data, &ev); err != nil || ev.ID == "" {
		return
	}
	n.mu.Lock()
	o, ok := n.owned[ev.ID]
	if ok && o.ended {
		n.mu.Unlock()
		n.log.Debug("ignoring a WORKLOADSTOPPED event: the workload's end is handled already", "workload_id", ev.ID)
		return
	}
	typ := o.typ
	keep := n.keep
	// Anyone who may publish feeds can send this event: it counts only for workloads
	// of a nexlet that does not report ends as requests (upstream's SDK).
	st, starting := n.starting[ev.ID]
	trusted := false
	for _, a := range n.agents {
		if (ok && a.owner == o.owner) || (!ok && starting && a.owner == st.owner) || (!ok && !starting && a.req.RegisterType == ev.WorkloadType) {
			trusted = trusted || !a.req.ReportsEnded
		}
	}
	if starting && !ok && trusted {
		st.ended = true // the deploy removes it once recorded
		n.starting[ev.ID] = st
	}
	if ok && !keep && trusted && (ev.WorkloadType == "" || ev.WorkloadType == typ) {
		o.ended = true // removed below: a list round that no longer finds it leaves it (listends.go)
		n.owned[ev.ID] = o
	}
	n.mu.Unlock()
	if !ok || keep {
		return
	}
	if !trusted {
		n.log.Debug("ignoring a WORKLOADSTOPPED event: the owning nexlet reports ends as requests", "workload_id", ev.ID)
		return
	}
	if ev.WorkloadType != "" && ev.WorkloadType != typ {
		return
	}
	// Said once it is so: a removal that failed is logged as such by unstore.
	if n.forget(ev.ID, typ) == nil {
		n.log.Info("workload ended; removed from node state", "workload_id", ev.ID, "namespace", ev.Namespace, "type", typ)
	}
}

// handleWorkloadEnded serves $NEX.SVC.<node>.agent.WORKLOADENDED.<agentId>.<workloadId>:
// the owning nexlet says a workload ended. Only that nexlet instance may end it in node
// state; a repeat (the nexlet retries until acknowledged) is acknowledged again.
func (n *Node) handleWorkloadEnded(r micro.Request) {
	defer n.changes.Add(1)
	agentID, workloadID := protocol.Token(r.Subject(), 5), protocol.Token(r.Subject(), 6)
	if !protocol.IsToken(agentID) || !protocol.IsToken(workloadID) {
		n.fail(r, 400, "bad workload ended subject", fmt.Errorf("workload ended: subject %q: want WORKLOADENDED.<agent id>.<workload id>", r.Subject()))
		return
	}
	if !n.ownInbox(r, agentID) {
		return
	}
	// The end of a stop at nexd's or the nexlet's shutdown: the workload stays in node
	// state, to be started again (the nexlet starts it once a replay of it comes). A
	// nexd killed in its shutdown's drain left such a stop running, and the next nexd
	// removed the workload on its end report (TestStopPastItsBoundAdoptedMidStop).
	var ended protocol.WorkloadStoppedEvent
	kept := protocol.Decode(r.Data(), &ended) == nil && ended.Kept
	n.mu.Lock()
	a := n.agents[agentID]
	o, owned := n.owned[workloadID]
	st, starting := n.starting[workloadID]
	keep := n.keep
	switch {
	case a == nil:
		n.mu.Unlock()
		n.fail(r, 403, "workload ended refused", fmt.Errorf("workload ended: nexlet %s is not registered with node %s", agentID, n.id))
		return
	case owned && o.owner != a.owner:
		n.mu.Unlock()
		n.log.Warn("workload ended refused: another nexlet runs it", "workload_id", workloadID, "agent_id", agentID, "owner", o.owner)
		n.fail(r, 403, "workload ended refused", fmt.Errorf("workload ended: workload %s is not run by nexlet %s", workloadID, agentID))
		return
	case !owned && starting && st.owner != a.owner:
		n.mu.Unlock()
		n.log.Warn("workload ended refused: its start went to another nexlet", "workload_id", workloadID, "agent_id", agentID, "owner", st.owner)
		n.fail(r, 403, "workload ended refused", fmt.Errorf("workload ended: workload %s is not run by nexlet %s", workloadID, agentID))
		return
	case !owned && starting:
		st.ended = true // the deploy removes it once recorded
		n.starting[workloadID] = st
	case owned && !kept:
		o.ended = true // removed below: the WORKLOADSTOPPED published from this report is not heard as another end
		n.owned[workloadID] = o
	}
	ns := ""
	switch g, ended := n.feeds.of(workloadID, time.Now()); {
	case owned:
		ns = o.ns
	case starting:
		ns = st.ns
	case ended && g.owner == a.owner:
		ns = g.ns
	}
	// A nexlet without the direct grant (relaying, or refused it) cannot put its own
	// WORKLOADSTOPPED on the feed: the node does, from the report.
	direct := a.direct
	n.mu.Unlock()
	if !direct && ns != "" {
		n.publishReportedStop(workloadID, ns, r.Data())
	}
	var ack protocol.WorkloadEndedAck
	if owned && !keep && !kept {
		// Removed only when it is: before, a failed removal (a tombstone kept) was
		// acknowledged as removed too.
		switch err := n.forget(workloadID, o.typ); { // a failed removal is logged by unstore
		case err == nil:
			ack.Removed = true
			n.log.Info("workload ended; removed from node state", "workload_id", workloadID, "type", o.typ, "agent_id", agentID)
		case errors.Is(err, ErrRemovalPending):
			ack.StateRemoval = protocol.StateRemovalPending
		default:
			ack.StateRemoval = protocol.StateRemovalFailed
		}
	}
	n.respondJSON(r, ack)
}
