package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// noRemoteRefs refuses every external $ref: a nexlet's schema must be self-contained,
// and the node must never read a file or URL a nexlet names.
type noRemoteRefs struct{}

func (noRemoteRefs) Load(url string) (any, error) {
	return nil, fmt.Errorf("external $ref %q is not allowed in a start request schema", url)
}

// compileSchema compiles a nexlet's start_request_schema.
func compileSchema(agentID, schema string) (*jsonschema.Schema, error) {
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(schema))
	if err != nil {
		return nil, fmt.Errorf("not valid JSON: %w", err)
	}
	c := jsonschema.NewCompiler()
	c.UseLoader(noRemoteRefs{})
	loc := "urn:nexd:nexlet:" + agentID + ":start_request"
	if err := c.AddResource(loc, doc); err != nil {
		return nil, err
	}
	s, err := c.Compile(loc)
	if err != nil {
		return nil, fmt.Errorf("does not compile: %w", err)
	}
	return s, nil
}

// startSchema is a registered nexlet's start request schema, compiled once. A schema
// in Options.KnownSchemas (the native nexlet's, which this binary carries and
// TestNativeSchemaCompiles compiles) is compiled after READY (CompileSchemas) or by the
// first deploy, whichever comes first, not while the registration that READY waits for
// is handled: 2-3 ms of a 2-core machine's start (the draft's meta-schemas on first
// use, then the schema). Any other schema is compiled at registration, which refuses
// one that does not compile.
type startSchema struct {
	agentID, text string
	once          sync.Once
	compiled      *jsonschema.Schema
	err           error
	done          atomic.Bool // compiled or err is set (tests)
}

func (s *startSchema) get() (*jsonschema.Schema, error) {
	s.once.Do(func() {
		s.compiled, s.err = compileSchema(s.agentID, s.text)
		s.done.Store(true)
	})
	return s.compiled, s.err
}

// CompileSchemas compiles the registered nexlets' schemas not compiled yet (see
// startSchema). The daemon calls it once READY is sent.
func (n *Node) CompileSchemas() {
	n.mu.Lock()
	pending := make([]*startSchema, 0, len(n.agents))
	for _, a := range n.agents {
		pending = append(pending, a.schema)
	}
	n.mu.Unlock()
	for _, s := range pending {
		if _, err := s.get(); err != nil {
			n.log.Error("a nexlet's start request schema does not compile; its deploys are refused", "agent_id", s.agentID, "err", err)
		}
	}
}

// register handles a registration that came over NATS (pair nil) or on the local
// channel pair of a native nexlet's start. One on the channel is trusted no more than
// one over NATS: the same checks, and it must be signed with the key of the start that
// holds the channel's other end.
func (n *Node) register(r micro.Request, pair *localChannel) {
	// A registration that gets as far as the registry counts there, as the nexlet
	// becomes visible (HoldsNothing); any other counts when it is refused.
	counted := false
	defer func() {
		if !counted {
			n.changes.Add(1)
		}
	}()
	agentID := protocol.Token(r.Subject(), 5)
	if !protocol.IsToken(agentID) {
		n.fail(r, 400, "bad agent id", fmt.Errorf("agent id %q in the subject must be letters, digits, - or _", agentID))
		return
	}
	if protocol.ReservedAgentID(agentID) {
		// Its subjects would be the node's own (TestRemoteNexletTakesAnothersAgentID).
		n.fail(r, 400, "bad agent id", fmt.Errorf("agent id %q is a word of node %s's own agent-plane subjects (%s.%s…); register under another", agentID, n.id, protocol.AgentPrefix(n.id), agentID))
		return
	}
	if pair == nil && !n.ownInbox(r, agentID) { // on the channel, the answer goes back on it
		return
	}
	var req protocol.RegisterAgentRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad agent registration", err)
		return
	}
	if req.Name != "" || req.RegisterType != "" {
		if err := errors.Join(checkOptionalName("nexlet name", req.Name), checkOptionalName("register_type", req.RegisterType)); err != nil {
			n.fail(r, 400, "bad agent registration", fmt.Errorf("invalid RegisterAgentRequest: field \"name\": %w", err))
			return
		}
	}
	if req.RegisterType == "" {
		n.fail(r, 400, "register_type is required", errors.New("invalid RegisterAgentRequest: field \"register_type\": must not be empty"))
		return
	}
	if req.MaxWorkloads < 0 {
		n.fail(r, 400, "bad agent registration", fmt.Errorf("invalid RegisterAgentRequest: field \"max_workloads\": %v must not be negative", req.MaxWorkloads))
		return
	}
	owner, key, err := n.authorize(r, agentID, req)
	if err != nil {
		n.refuseRegistration(r, 403, agentID, req, err)
		return
	}
	if pair != nil && (key == "" || key != pair.key) {
		n.refuseRegistration(r, 403, agentID, req, fmt.Errorf("registration on the local channel of nexlet %s is not signed with the key of the start that holds the channel", agentID))
		return
	}
	charged, dropped := n.chargeReregistration(agentID, owner, key)
	if dropped {
		return
	}
	if code, err := n.nameFree(agentID, owner, key, req.Name); err != nil {
		n.refuseRegistration(r, code, agentID, req, err)
		return
	}
	if err := n.idFree(agentID, owner, key); err != nil {
		n.refuseRegistration(r, 409, agentID, req, err)
		return
	}
	schema := &startSchema{agentID: agentID, text: req.StartRequestSchema}
	if !slices.Contains(n.o.KnownSchemas, req.StartRequestSchema) {
		if _, err := schema.get(); err != nil {
			n.fail(r, 400, "bad start request schema", fmt.Errorf("invalid RegisterAgentRequest: field \"start_request_schema\": %w", err))
			return
		}
	}
	relayed := feedRelayed(owner, key, req)
	direct := n.directFeeds(agentID, owner, key, relayed, req)
	rr := n.beginRead()
	stored, err := n.o.Store.ByType(n.ctx, req.RegisterType)
	if err != nil {
		// Registered with nothing replayed, the nexlet would take every workload it
		// holds records of for one the node no longer has: a live one left running
		// unlisted and unmanaged, an ended one's records removed, its restart by
		// policy or its end's report lost (e2e TestNexletRestartWhileStateUnreadable).
		// Refused (before any credentials are minted for it), it registers again:
		// nexd's SDK retries this refusal. Its token goes back: the retries of an
		// outage of any length would use up its bucket, and its registration once the
		// state reads again be dropped (TestHonestReregistrationsNotDropped).
		n.endRead(rr)
		if charged {
			n.agentRenewals.refund(agentID, agentRenewBurst)
		}
		id := randid.New()
		n.log.Warn("failed to read node state for a registering nexlet; registration refused until it can be read", "agent_id", agentID, "type", req.RegisterType, "err", err, "error_id", id)
		body, _ := json.Marshal(protocol.ErrorBody{ErrorID: id, Error: "the node's state store (JetStream) cannot be read for the nexlet's stored workloads; register again"})
		if rerr := r.Error("503", protocol.ErrTextStateUnreadable, body); rerr != nil {
			n.log.Warn("failed to send error reply", "err", rerr)
		}
		return
	}
	creds, err := n.o.Minter.MintAgent(agentID, n.id, direct)
	if err != nil {
		n.endRead(rr)
		n.fail(r, 500, "failed to mint nexlet credentials", fmt.Errorf("mint agent %s: %w", agentID, err))
		return
	}
	existing := map[string]protocol.AgentStartWorkloadRequest{}
	for wid, swr := range stored {
		// The store checked it (state.DecodeRecord); checked again here so that no
		// Store hands a nexlet an id that is not a plain token or a record without a
		// namespace.
		if err := state.CheckRecord(req.RegisterType+"_"+wid, swr); err != nil {
			n.log.Warn("not replaying a workload record of node state", "agent_id", agentID, "workload_id", wid, "err", err)
			delete(stored, wid)
		}
	}
	n.mu.Lock()
	delete(n.regReads, rr)
	takeOver := map[string]protocol.StartWorkloadRequest{}
	for wid := range n.starting {
		// Recorded before its start: the deploy in flight starts it, not the replay;
		// unless its nexlet's process ended before it answered and this is its
		// successor, which takes it over (after reconcile: it is held, if at all, as
		// a start, not as a job that ran).
		if c := n.handableStarts[wid]; c != nil && stored[wid].Owner == owner && c.agent.owner == owner && c.nexletGoneLocked() {
			takeOver[wid] = stored[wid]
		}
		delete(stored, wid)
	}
	for wid := range rr.ids {
		// In flight when the read began, or sent since: no longer starting, it was
		// answered, refused or given up on before this lock, and its deploy decided
		// (kept, marked, removed or stopped), not the replay. Before, such a job was
		// read unmarked, under the nexlet's current memory and absent from a list made
		// before its start came, and was replayed as one never sent: a second start
		// (TestReregisterDuringDeployNotReplayed).
		delete(stored, wid)
	}
	for wid, swr := range stored {
		// Another nexlet instance's workload (of the same type) is not replayed here:
		// the owner this node knows, else the one recorded with it (after a restart of
		// nexd); a record without one (an older nexd's) goes to the type.
		rec := swr.Owner
		if o, ok := n.owned[wid]; ok {
			rec = o.owner
		}
		if rec != "" && rec != owner {
			delete(stored, wid)
		}
	}
	n.mu.Unlock()
	n.reconcile(agentID, owner, req, stored)
	maps.Copy(stored, takeOver)
	for wid, swr := range stored {
		swr.Owner, swr.Memory, swr.Started = "", "", false // node state only
		wc, err := n.o.Minter.MintWorkload(swr.Namespace, wid)
		if err != nil {
			n.log.Warn("not replaying workload: minting its credentials failed", "workload_id", wid, "namespace", swr.Namespace, "err", err)
			continue
		}
		ac, err := n.mintArtifactReader(swr, wid)
		if err != nil {
			n.log.Warn("not replaying workload: minting its artifact reader failed", "workload_id", wid, "namespace", swr.Namespace, "err", err)
			continue
		}
		existing[wid] = protocol.AgentStartWorkloadRequest{Request: swr, WorkloadCreds: wc, ArtifactCreds: ac}
	}

	now := time.Now()
	_, life := userLifetime(creds)
	reg := &registration{id: agentID, owner: owner, key: key, direct: direct, life: life, req: req, schema: schema, registeredAt: now, lastSeen: now, reported: protocol.HealthUnknown, replays: len(existing)}
	var replaced []*registration
	n.mu.Lock()
	if lr, ok := r.(*localRequest); ok && lr.c.CallerGone() {
		// Gave up while this ran: its registration over NATS, if it came first, stays.
		n.mu.Unlock()
		n.dropAbandoned(agentID, lr)
		return
	}
	if code, err := n.nameFreeLocked(agentID, owner, key, req.Name, time.Now()); err != nil {
		// Bound since nameFree by a registration of its holder that ran alongside,
		// or its other registrations bound names meanwhile, or taken by another
		// nexlet's registration that ran alongside.
		n.mu.Unlock()
		n.refuseRegistration(r, code, agentID, req, err)
		return
	}
	if err := n.idFreeLocked(agentID, owner, key, time.Now()); err != nil {
		// Taken since idFree by another nexlet's registration that ran alongside.
		n.mu.Unlock()
		n.refuseRegistration(r, 409, agentID, req, err)
		return
	}
	// Claimed only by a registration that commits: one refused above (its name or id
	// taken by another's registration that ran alongside) hands back nothing, and a
	// record without an owner stays the type's (TestRefusedRegistrationClaimsNoRecord).
	for wid, w := range existing {
		n.owned[wid] = ownership{typ: w.Request.WorkloadType, owner: owner, ns: w.Request.Namespace, name: w.Request.Name}
		delete(n.renewed, wid) // the replay's user is the newest
		n.replayed[wid] = struct{}{}
	}
	newlyBound := ""
	if sup, ok := n.expected[agentID]; ok && req.Name != "" {
		if _, was := n.bound[req.Name]; !was {
			newlyBound = sup
			n.bindings[sup]++
		}
		n.bound[req.Name] = sup
	}
	if pair != nil {
		// It came on the channel, signed with the key of the start that holds it
		// (checked above): that one, not whichever the node last took for the nexlet
		// (an adopted nexlet's connections all hold its start's key).
		reg.local = pair.c
	} else if l, ok := n.locals[agentID]; ok && !l.adopted && key != "" && l.key == key {
		// Signed with the key of the start that holds the channel's other end: the
		// same process (a later start of the nexlet gets a new key and channel).
		reg.local = l.c
	}
	for id, old := range n.agents {
		// A restarted nexlet registers again, under its old id or (remote) a new
		// one; nameFree refused the name of a live other nexlet.
		if id == agentID || (req.Name != "" && old.req.Name == req.Name) {
			replaced = append(replaced, old)
			delete(n.agents, id)
		}
	}
	n.agents[agentID] = reg
	n.regChanges, counted = n.changes.Add(1), true
	n.notifyLocked()
	n.mu.Unlock()
	if newlyBound != "" && n.o.OnNameBound != nil {
		n.o.OnNameBound(newlyBound, req.Name)
	}
	for _, old := range replaced {
		if old.id != agentID {
			n.agentStopped(old, fmt.Sprintf("replaced by a new registration of %q as %s", req.Name, agentID))
		}
	}

	defer n.revokeAgentSuperseded(agentID, creds)
	n.respondJSON(r, protocol.RegisterAgentResponse{
		ConnectionData: creds,
		ExistingState:  existing,
		Message:        fmt.Sprintf("registered %s [%s] as %s", req.Name, req.RegisterType, agentID),
		NodeID:         n.id,
		Success:        true,
		NexdFeedRelay:  relayed, // its user may not publish on $NEX.FEED (MintAgent)
	})
	n.handOverStarts(takeOver, existing)
	n.log.Info("nexlet registered", "agent_id", agentID, "name", req.Name, "type", req.RegisterType,
		"version", req.Version, "replayed", len(existing))
	n.o.Emitter.Emit(n.id, protocol.EventAgentStarted, protocol.AgentStartedEvent{ID: agentID, Name: req.Name, RegisterType: req.RegisterType, Timestamp: now.UTC()})
}

// regRead is one registration's read of node state: the deploys in flight when it
// began (n.starting then) and those reserved since, until the registration takes the
// lock after the read. Its record may have been read before such a deploy committed
// and the nexlet's list made before the start reached it, so neither says whether the
// nexlet has the job.
type regRead struct{ ids map[string]struct{} }

// beginRead registers a read of node state for a registration; register drops it
// from n.regReads under the lock it takes after the read.
func (n *Node) beginRead() *regRead {
	n.mu.Lock()
	defer n.mu.Unlock()
	rr := &regRead{ids: make(map[string]struct{}, len(n.starting))}
	for wid := range n.starting {
		rr.ids[wid] = struct{}{}
	}
	n.regReads[rr] = struct{}{}
	return rr
}

// endRead drops rr, a registration's read of node state, from n.regReads: the
// registration was refused.
func (n *Node) endRead(rr *regRead) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.regReads, rr)
}

// handOverStarts ends the deploys in flight that a registration took over as replays
// (those in existing): their nexlet ended before it answered, so no answer comes, and
// the successor adopts what the start forked or starts it. Before, such a deploy was
// not replayed (in flight), the successor left its forked process running unmanaged,
// and the deploy waited out its silence, found no nexlet holding it, and answered
// "outcome unknown" (e2e TestDeployKilledBeforePidRecord).
func (n *Node) handOverStarts(takeOver map[string]protocol.StartWorkloadRequest, existing map[string]protocol.AgentStartWorkloadRequest) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for wid := range takeOver {
		c := n.handableStarts[wid]
		if _, replayed := existing[wid]; !replayed || c == nil {
			continue
		}
		delete(n.handableStarts, wid) // once: a second successor replays it from state
		close(c.handed)
	}
}

// reconcile compares the registering nexlet's stored workloads with those it says it
// holds (RegisterAgentRequest.Workloads; nothing to do when it does not say): a job it
// does not hold ran before (its end was never acknowledged, or its nexlet lost the
// record), so it leaves node state and stored instead of being started a second time;
// unless its start was never confirmed (Started) and it was recorded under the
// nexlet's current memory of starts (Memory), which would hold it had the start come:
// then it never reached the nexlet and stays in stored, to be started.
// A service it does not hold stays in stored and is started again, unless the nexlet
// says it stopped it at a request (RegisterAgentRequest.Stopped): the node that asked
// died before it removed it from state (a drain or a stop cut short by a kill), and
// starting it again would undo the stop.
func (n *Node) reconcile(agentID, owner string, req protocol.RegisterAgentRequest, stored map[string]protocol.StartWorkloadRequest) {
	if req.Workloads == nil {
		return
	}
	held := make(map[string]bool, len(*req.Workloads))
	for _, id := range *req.Workloads {
		held[id] = true
	}
	stopped := make(map[string]bool, len(req.Stopped))
	for _, id := range req.Stopped {
		stopped[id] = true
	}
	var mark map[string]protocol.StartWorkloadRequest
	for wid, swr := range stored {
		if held[wid] {
			if swr.WorkloadLifecycle == protocol.LifecycleJob && !swr.Started && swr.Memory != "" {
				// Its nexd died before it marked the start: marked now, so that the
				// record says it ran once the nexlet forgets it (a finished job, an
				// hour on), whatever memory the nexlet has then.
				swr.Started = true
				if mark == nil {
					mark = map[string]protocol.StartWorkloadRequest{}
				}
				mark[wid] = swr
			}
			continue
		}
		if stopped[wid] {
			delete(stored, wid)
			n.log.Info("workload its nexlet stopped at a request is still in node state: removed, not started again",
				"workload_id", wid, "agent_id", agentID, "owner", owner)
			n.forget(wid, req.RegisterType)
			continue
		}
		if swr.WorkloadLifecycle != protocol.LifecycleJob {
			continue
		}
		if !swr.Started && swr.Memory != "" && swr.Memory == req.Memory {
			// Recorded under the memory the nexlet still has, which holds every start
			// it took since, and never answered: its start never reached the nexlet
			// (nexd died between the record and the send). Before, it was removed
			// as one that ran: never run (e2e TestDeployKilledBeforeSendRunsOnce).
			n.log.Info("job recorded but never started: its start did not reach its nexlet; starting it",
				"workload_id", wid, "agent_id", agentID, "owner", owner)
			continue
		}
		delete(stored, wid)
		if !swr.Started && swr.Memory != "" {
			// Its start was never seen answered, and the nexlet's memory of starts is
			// not the one it was sent under (a reboot, a shutdown's stops): it may
			// have run, and a job runs at most once.
			n.log.Warn("job not held by its nexlet, its start never confirmed, and the nexlet's memory of starts is newer (a reboot or a stop at shutdown since): it may never have run; removed from node state, not started (a job runs at most once)",
				"workload_id", wid, "agent_id", agentID, "owner", owner)
		} else {
			n.log.Info("job not held by its nexlet when it registered: it ran before; removed from node state, not started again",
				"workload_id", wid, "agent_id", agentID, "owner", owner)
		}
		n.forget(wid, req.RegisterType)
	}
	if len(mark) > 0 {
		n.own("start marks of nexlet "+agentID, func() {
			for wid, swr := range mark {
				ctx, cancel := context.WithTimeout(withNamespace(n.ctx, swr.Namespace), rollbackWait)
				if err := n.o.Store.MarkStarted(ctx, req.RegisterType, wid, swr); err != nil {
					n.log.Debug("a held job's record not marked started", "workload_id", wid, "err", err)
				}
				cancel()
			}
		})
	}
}

// authorize decides whether this registration may take agentID and returns the
// nexlet's stable identity. A local nexlet (an id the supervisor assigned) proves its
// start with the per-start key the supervisor handed it; a remote one with the key
// listed for its name and type in remote_nexlets.
func (n *Node) authorize(r micro.Request, agentID string, req protocol.RegisterAgentRequest) (owner, key string, err error) {
	n.mu.Lock()
	name, expected := n.expected[agentID]
	key = n.keys[agentID]
	n.mu.Unlock()
	if expected {
		if key != "" {
			if err := n.verifyRegistration(r, key); err != nil {
				return "", "", fmt.Errorf("supervised nexlet %q (agent id %s): %w", name, agentID, err)
			}
		}
		return "local:" + name, key, nil
	}
	if !n.o.AllowRemoteRegistration {
		return "", "", fmt.Errorf("agent id %s was not assigned by node %s and remote registration is disabled (allow_remote_agent_registration)", agentID, n.id)
	}
	pub := r.Headers().Get(protocol.HeaderRegistrationKey)
	if len(n.o.RemoteNexlets) == 0 {
		return "", "", fmt.Errorf("remote nexlet %q: no remote_nexlets are configured; list it with its name, type and public key", req.Name)
	}
	for _, rn := range n.o.RemoteNexlets {
		if rn.PublicKey != pub {
			continue
		}
		if rn.Name != req.Name || rn.Type != req.RegisterType {
			return "", "", fmt.Errorf("remote nexlet key %s is listed for %q [%s], not %q [%s]", pub, rn.Name, rn.Type, req.Name, req.RegisterType)
		}
		if err := n.verifyRegistration(r, pub); err != nil {
			return "", "", fmt.Errorf("remote nexlet %q: %w", req.Name, err)
		}
		return "remote:" + rn.Name, pub, nil
	}
	if pub == "" {
		return "", "", fmt.Errorf("remote nexlet %q sent no %s header: it must sign its registration with the key listed in remote_nexlets", req.Name, protocol.HeaderRegistrationKey)
	}
	return "", "", fmt.Errorf("remote nexlet %q: key %s is not listed in remote_nexlets", req.Name, pub)
}

// chargeReregistration charges a registration of a nexlet already registered with
// this node process, as the same instance (the same owner and key: a new start is
// signed with a new key), to the bucket of its renewals of its own user
// (agentRenewBurst, agentRenewsPerLife): each mints a nexlet user and a user for every
// workload the node hands back, kept until that workload ends and then revoked. It
// says whether a token was taken and whether the registration is dropped unanswered.
// A nexlet registers once a process of the node's (again after an answer it lost, or
// a refusal while the node cannot read its state, whose token is given back); before,
// a rogue nexlet registering as fast as it could had every one served
// (TestAttackNexletReregistrationFloodBounded).
func (n *Node) chargeReregistration(agentID, owner, key string) (charged, dropped bool) {
	n.mu.Lock()
	old := n.agents[agentID]
	n.mu.Unlock()
	if old == nil || old.owner != owner || old.key != key || old.life <= 0 {
		return false, false
	}
	ok := n.agentCallAllowed(old, "nexlet registrations dropped unanswered: it registered again more than it needs",
		&n.reregsDropped)
	return ok, !ok
}

// feedRelayed reports whether a nexlet's feeds go through the node's relay (its user
// gets no $NEX.FEED grant). An unsigned one (upstream's SDK) cannot relay. A signed
// one relays unless it does not say it can (an SDK older than the relay: an adopted
// native nexlet of the nexd before an upgrade) and it is the supervised nexlet signed
// with its start's key, which nexd or its predecessor started: any other signer (a
// remote nexlet) is relayed whatever it says, so a rogue cannot claim to be old.
func feedRelayed(owner, key string, req protocol.RegisterAgentRequest) bool {
	if key == "" {
		return false
	}
	return req.FeedRelay || !strings.HasPrefix(owner, "local:")
}

// directFeeds reports whether a nexlet that does not relay its feeds gets the direct
// grant on every namespace's $NEX.FEED: only with allow_nexlet_direct_feeds, as any
// nexlet holding it can write in any workload's logs, metrics and events. Without,
// the nexlet is warned of once (per instance, not per restart): its feeds are
// refused by the server, and the key that lets them through is named.
func (n *Node) directFeeds(agentID, owner, key string, relayed bool, req protocol.RegisterAgentRequest) bool {
	switch {
	case relayed:
		return false
	case n.o.AllowDirectFeeds && key != "":
		n.log.Warn("an older nexlet (no nexd_feed_relay) keeps the direct feed grant until it restarts: it is the supervised nexlet, signed with its start's key",
			"agent_id", agentID, "name", req.Name, "version", req.Version)
		return true
	case n.o.AllowDirectFeeds:
		return true
	case !n.o.Minter.PrivateInboxes():
		return false // a shared or no user: nothing is refused, nothing to warn of
	}
	n.mu.Lock()
	warned := n.feedsWarned[owner]
	n.feedsWarned[owner] = true
	n.mu.Unlock()
	if !warned {
		n.log.Warn("nexlet may not publish its workloads' logs, metrics and events: it publishes them on $NEX.FEED (upstream's SDK, or nexd's older than the feed relay) and the server refuses them; the node hears an upstream-SDK nexlet's workload ends only by listing it (a job that ends within a list period of the nexlet's crash runs again when it registers again); set allow_nexlet_direct_feeds to grant every such nexlet every namespace's feeds",
			"agent_id", agentID, "name", req.Name, "version", req.Version, "signed", key != "", "ends_listed", !req.ReportsEnded)
	}
	return false
}

// idFree refuses an agent id that a live nexlet of another identity holds (409). A
// supervised nexlet's id is its start's (authorize checked that start's key, and a
// restart, with a new key, replaces its predecessor); any other is a remote nexlet's,
// and only the same remote nexlet, signed with the same listed key, replaces it while
// it lives: a restart registers again at once. Before, the node checked the key, not
// the id, so on an open bus (no minted users, where any client may register under any
// id) one listed remote nexlet registered under another's id and pushed it off
// (TestRemoteNexletTakesAnothersAgentID). An offline holder's id may be taken.
func (n *Node) idFree(agentID, owner, key string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.idFreeLocked(agentID, owner, key, time.Now())
}

func (n *Node) idFreeLocked(agentID, owner, key string, now time.Time) error {
	if _, supervised := n.expected[agentID]; supervised {
		return nil
	}
	old, ok := n.agents[agentID]
	if !ok || (old.owner == owner && old.key == key) || n.health(old, now) == protocol.HealthOffline {
		return nil
	}
	return fmt.Errorf("agent id %s is held by live nexlet %q [%s], which registered with another key; it may not be taken until that nexlet is gone", agentID, old.req.Name, old.req.RegisterType)
}

// nameFree refuses a name bound to another supervised nexlet or, to a supervised one,
// listed for a remote nexlet (403), or held by another live nexlet (409). A restart of
// the same nexlet (same agent id; a remote one signed with its listed key, also under
// the new id RREGISTER handed it) or a successor of an offline one may take it.
func (n *Node) nameFree(agentID, owner, key, name string) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.nameFreeLocked(agentID, owner, key, name, time.Now())
}

func (n *Node) nameFreeLocked(agentID, owner, key, name string, now time.Time) (int, error) {
	if name == "" {
		return 0, nil
	}
	if err := errors.Join(n.boundLocked(agentID, name), n.bindsLocked(agentID, name)); err != nil {
		return 403, err
	}
	if sup, ok := n.expected[agentID]; ok && name != sup && n.listedRemote(name) {
		// A supervised nexlet binds each name it registers under (register): a rogue
		// one took a listed remote nexlet's name while it was away, and kept it.
		return 403, fmt.Errorf("nexlet name %q is listed for a remote nexlet in remote_nexlets; supervised nexlet %q (agent id %s) may not register under it", name, sup, agentID)
	}
	for id, old := range n.agents {
		if key != "" && strings.HasPrefix(owner, "remote:") && old.owner == owner && old.key == key {
			// The same remote nexlet, restarted: with minted users it registers under
			// the new id RREGISTER gave it, and was refused until its old registration
			// went offline (TestRemoteNexletRestartsUnderANewID).
			continue
		}
		if id != agentID && old.req.Name == name && n.health(old, now) != protocol.HealthOffline {
			return 409, fmt.Errorf("nexlet name %q is taken by live nexlet %s [%s]", name, id, old.req.RegisterType)
		}
	}
	return 0, nil
}

// boundLocked refuses a name bound to a supervised nexlet (see Node.bound) to any agent
// id but the one nexd minted for that nexlet's current run, live or not: else a rogue
// could take it while that one restarts, and the name being live would refuse that
// one's return.
func (n *Node) boundLocked(agentID, name string) error {
	sup, ok := n.bound[name]
	if !ok || n.current[sup] == agentID {
		return nil
	}
	return fmt.Errorf("nexlet name %q is reserved for supervised nexlet %q (agent id %s); agent id %s may not register under it", name, sup, n.current[sup], agentID)
}

// MaxBoundNames bounds the names a supervised nexlet's registrations may bind in a
// run (each is reserved for it and kept in <state_dir>/nexlets/<name>.names): a rogue
// one registering under ever new names grew that file, and the node's map, without end.
const MaxBoundNames = 16

// bindsLocked refuses a supervised nexlet's registration under a name not yet bound
// when its registrations bound MaxBoundNames in this run.
func (n *Node) bindsLocked(agentID, name string) error {
	sup, ok := n.expected[agentID]
	if !ok || name == "" || n.bindings[sup] < MaxBoundNames {
		return nil
	}
	if _, was := n.bound[name]; was {
		return nil
	}
	return fmt.Errorf("supervised nexlet %q (agent id %s) registered under %d names in this run, the most it may; it may not register under another, %q", sup, agentID, MaxBoundNames, name)
}

// refuseRegistration answers a refused registration and logs it with the reason.
func (n *Node) refuseRegistration(r micro.Request, code int, agentID string, req protocol.RegisterAgentRequest, err error) {
	n.log.Warn("nexlet registration refused", "agent_id", agentID, "name", req.Name, "type", req.RegisterType, "err", err)
	n.fail(r, code, "registration refused", err)
}

// SetAgentKey records the public key of the per-start registration key the supervisor
// handed the local nexlet agentID: its next registration must be signed with it.
func (n *Node) SetAgentKey(agentID, pub string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.keys[agentID] = pub
}

// localChannel is a channel to a local nexlet's start, and that start's key.
type localChannel struct {
	key string
	c   *localchan.Client
	// adopted: opened on nexd's socket by a nexlet nexd adopted (SetAdoptedLocal),
	// not the pair of a start.
	adopted bool
}

// SetAgentLocal records the channel to the start of the local nexlet agentID whose
// registration key is key (c nil: that start ended). A registration signed with that
// key gets its start requests over the channel instead of NATS.
// The nexlet's calls on the channel (its registration) are served once the node
// serves (Start), as they would be over NATS.
func (n *Node) SetAgentLocal(agentID, key string, c *localchan.Client) {
	n.setLocal(agentID, localChannel{key: key, c: c})
}

// SetAdoptedLocal is SetAgentLocal for the channel that the nexlet agentID, which this
// nexd adopted, opened on nexd's socket (the nexlets manager admitted its process). It
// serves only a registration that comes on it signed with key, the adopted start's: a
// registration over NATS never takes it, as every connection of that nexlet holds the
// same key.
func (n *Node) SetAdoptedLocal(agentID, key string, c *localchan.Client) {
	n.setLocal(agentID, localChannel{key: key, c: c, adopted: true})
}

func (n *Node) setLocal(agentID string, l localChannel) {
	c := l.c
	n.mu.Lock()
	if c == nil {
		delete(n.locals, agentID)
		n.mu.Unlock()
		return
	}
	n.locals[agentID] = l
	serving := n.svc != nil
	n.mu.Unlock()
	if serving {
		c.OnCall(n.localCalls(agentID, l))
		c.OnFeed(n.localFeeds(agentID, c))
	}
}

// localCalls serves the calls on the local channel of agentID's start l, one at a
// time (the nexlet waits for each answer; one that does not is answered 429 at once,
// so calls cannot pile up goroutines), each on a goroutine Stop waits for.
func (n *Node) localCalls(agentID string, l localChannel) func(*localchan.Call) {
	var busy atomic.Bool
	return func(c *localchan.Call) {
		if !busy.CompareAndSwap(false, true) {
			n.fail(&localRequest{c: c}, 429, "one call at a time on the local channel",
				fmt.Errorf("nexlet %s called on its local channel before its last call was answered", agentID))
			return
		}
		r := &localRequest{c: c, answering: func() { busy.Store(false) }}
		if !n.own("local call of nexlet "+agentID, func() { n.handleLocalCall(agentID, l, r) }) {
			n.fail(r, 503, "node stopping", errors.New("the node is stopping"))
		}
	}
}

// handleLocalCall serves one call of a nexlet on its local channel: only its own
// registration is served there.
func (n *Node) handleLocalCall(agentID string, l localChannel, r *localRequest) {
	c := r.c
	if n.ctx.Err() != nil {
		n.fail(r, 503, "node stopping", errors.New("the node is stopping"))
		return
	}
	if c.CallerGone() {
		// The nexlet gave up waiting (its register timeout) and registers over
		// NATS: this registration, kept until the node served, must not replace
		// that one (and revoke its credentials).
		n.dropAbandoned(agentID, r)
		return
	}
	if want := protocol.RegisterSubject(n.id, agentID); c.Subject != want {
		n.log.Warn("call on a nexlet's local channel refused", "agent_id", agentID, "subject", c.Subject)
		n.fail(r, 400, "not served on the local channel",
			fmt.Errorf("the local channel of nexlet %s serves only its registration (%s), not %q", agentID, want, c.Subject))
		return
	}
	n.register(r, &l)
}

// dropAbandoned leaves unanswered a registration on the local channel whose nexlet
// gave up waiting for it (CallerGone), freeing the channel for its next call.
func (n *Node) dropAbandoned(agentID string, r *localRequest) {
	n.log.Info("dropped a registration on a nexlet's local channel: the nexlet gave up waiting for it", "agent_id", agentID)
	if r.answering != nil {
		r.answering()
	}
}

// localRequest is a micro.Request that came on a nexlet's local channel and is
// answered there; answering (if set) is called right before the answer is sent.
type localRequest struct {
	c         *localchan.Call
	answering func()
}

func (l *localRequest) Respond(b []byte, opts ...micro.RespondOpt) error {
	m := &nats.Msg{Data: b, Header: nats.Header{}}
	for _, o := range opts {
		o(m)
	}
	if l.answering != nil {
		l.answering()
	}
	return l.c.Reply(m)
}

func (l *localRequest) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("%w: %w", micro.ErrMarshalResponse, err)
	}
	return l.Respond(b, opts...)
}

func (l *localRequest) Error(code, desc string, data []byte, opts ...micro.RespondOpt) error {
	return l.Respond(data, append(slices.Clip(opts), func(m *nats.Msg) {
		m.Header.Set(protocol.HeaderErrorCode, code)
		m.Header.Set(protocol.HeaderError, desc)
	})...)
}

func (l *localRequest) Data() []byte           { return l.c.Data }
func (l *localRequest) Headers() micro.Headers { return micro.Headers(l.c.Header) }
func (l *localRequest) Subject() string        { return l.c.Subject }
func (l *localRequest) Reply() string          { return "" }

// ownInbox reports whether a request from the child with this id may be answered on
// its reply subject: with private inboxes only the child's own prefix is, so that no
// credentials ever go to an inbox another client can read. A refusal is logged with
// the reason and not answered (the reply subject is not the child's).
func (n *Node) ownInbox(r micro.Request, id string) bool {
	if !n.o.Minter.PrivateInboxes() || strings.HasPrefix(r.Reply(), protocol.InboxPrefix(id)+".") {
		return true
	}
	n.log.Warn("request refused: the reply subject is not the sender's private inbox",
		"subject", r.Subject(), "reply", r.Reply(), "want_prefix", protocol.InboxPrefix(id)+".")
	return false
}

// handleRemoteRegister serves $NEX.SVC.<nexus>.agent.RREGISTER (queue group = nexus,
// so one node of the nexus answers).
func (n *Node) handleRemoteRegister(r micro.Request) {
	var req protocol.RegisterRemoteAgentRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad remote registration", err)
		return
	}
	if !n.o.Minter.CanMint() {
		n.fail(r, 403, "node cannot mint credentials", fmt.Errorf("node %s cannot mint credentials for a remote nexlet: configure issuer_signing_key and issuer_signing_key_root_account (or issuer_nkey and issuer_nkey_seed)", n.id))
		return
	}
	agentID := randid.New()
	creds, err := n.o.Minter.MintRegister(agentID, n.id)
	if err != nil {
		n.fail(r, 500, "failed to mint registration credentials", fmt.Errorf("mint register %s: %w", agentID, err))
		return
	}
	n.log.Info("remote nexlet assigned an id", "agent_id", agentID)
	n.respondJSON(r, protocol.RegisterRemoteAgentResponse{AssignedAgentID: agentID, RegistrationCreds: &creds, RespondTo: n.id})
}

func checkOptionalName(what, s string) error {
	if s == "" {
		return nil
	}
	return protocol.CheckName(what, s)
}
