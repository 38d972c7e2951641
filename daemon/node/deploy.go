package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/protocol"
)

// handleDeploy serves ADEPLOY: everything that can refuse the deploy is checked before
// the nexlet is asked to start it, the state record (the intent) is written before the
// start and kept after it, and the client gets one answer: started, not started
// (HeaderDeployOutcome), or, only when the nexlet never answered and the node could
// not stop it, an explicit "outcome unknown".
func (n *Node) handleDeploy(r micro.Request) {
	bidderID := protocol.Token(r.Subject(), 5)
	b, ok := n.takeBid(bidderID)
	if !ok {
		return // another node's bid, or expired: upstream is silent
	}
	st := steps.Start(n.log) // nil unless the node logs at debug level
	defer n.keepAlive(r)()
	deployed := false
	if n.o.Observer != nil {
		start := time.Now()
		defer func() { n.o.Observer.Deploy(time.Since(start), deployed) }()
	}
	var req protocol.StartWorkloadRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.refuse(r, 400, "bad start workload request", err)
		return
	}
	req.Owner, req.Memory, req.Started = "", "", false // the node's to set, in its own record only
	if ns := protocol.NamespaceOf(r.Subject()); ns != req.Namespace && ns != protocol.SystemNamespace {
		n.refuse(r, 403, "namespace mismatch", fmt.Errorf("namespace mismatch: subject namespace %q, request namespace %q", ns, req.Namespace))
		return
	}
	if err := protocol.CheckNamespace(req.Namespace); err != nil {
		n.refuse(r, 400, "bad start workload request", fmt.Errorf("invalid StartWorkloadRequest: field \"namespace\": %w", err))
		return
	}
	if err := protocol.CheckName("workload name", req.Name); err != nil {
		n.refuse(r, 400, "bad start workload request", fmt.Errorf("invalid StartWorkloadRequest: field \"name\": %w", err))
		return
	}
	if n.o.CanPlace != nil {
		if err := n.o.CanPlace(); err != nil {
			n.refuse(r, 409, "workload cannot be placed", fmt.Errorf("node %s: %w", n.id, err))
			return
		}
	}
	workloadID := randid.New()
	res, code, err := n.reserve(b, req, workloadID)
	if err != nil {
		n.refuse(r, code, "workload cannot be placed", err)
		return
	}
	defer func() { _ = res.rollback() }()
	// A refusal rolls back first: the client's "not started" is definitive only if the
	// record of the intent is already gone when it hears it (a nexd that died between
	// the reply and a deferred delete would replay a deploy its client was told failed).
	refuse := func(code int, description string, err error) {
		if !n.rolledBack(r, res, err) {
			return
		}
		n.refuse(r, code, description, err)
	}
	a := res.agent
	schema, err := a.schema.get()
	if err != nil {
		refuse(500, "nexlet's start request schema does not compile", fmt.Errorf("nexlet %q (type %s): start_request_schema: %w", a.req.Name, req.WorkloadType, err))
		return
	}
	if err := validateRunRequest(schema, req.RunRequest); err != nil {
		refuse(400, "run_request rejected", fmt.Errorf("run_request for nexlet %q (type %s): %w", a.req.Name, req.WorkloadType, err))
		return
	}
	creds, err := n.o.Minter.MintWorkload(req.Namespace, workloadID)
	if err != nil {
		refuse(500, "failed to mint workload credentials", fmt.Errorf("mint workload %s in %s: %w", workloadID, req.Namespace, err))
		return
	}
	if size := protocol.WorkloadCredentialsSize(creds); size > protocol.MaxWorkloadCredentials {
		// The namespace bound keeps within it, except with a long nats.jsdomain. The
		// node bids in no such namespace (WorkloadNamespaceFits); a deploy from an
		// auction of the system namespace may still name one.
		refuse(400, "workload credentials too large", fmt.Errorf("workload not started: its NATS credentials in namespace %q would be %d bytes (user JWT and connection name), more than %d: the CONNECT line carrying them would not fit nats-server's default 4 KiB control line, so it could not connect; every artifact grant names nats.jsdomain too: use a shorter namespace or JetStream domain",
			req.Namespace, size, protocol.MaxWorkloadCredentials))
		return
	}
	artifactCreds, err := n.mintArtifactReader(req, workloadID)
	if err != nil {
		refuse(500, "failed to mint artifact credentials", fmt.Errorf("mint artifact reader %s in %s: %w", workloadID, req.Namespace, err))
		return
	}
	if artifactCreds != nil && protocol.WorkloadCredentialsSize(*artifactCreds) > protocol.MaxWorkloadCredentials {
		refuse(400, "artifact credentials too large", fmt.Errorf("workload not started: the NATS credentials its nexlet fetches its artifact with in namespace %q would be %d bytes, more than %d (nats-server's default 4 KiB control line); every artifact grant names nats.jsdomain: use a shorter namespace or JetStream domain",
			req.Namespace, protocol.WorkloadCredentialsSize(*artifactCreds), protocol.MaxWorkloadCredentials))
		return
	}
	body, err := protocol.Marshal(protocol.AgentStartWorkloadRequest{Request: req, WorkloadCreds: creds, ArtifactCreds: artifactCreds})
	if err != nil {
		refuse(500, "failed to encode start request", err)
		return
	}
	st.Step("check") // decode, reserve, schema, credentials, encode
	// The intent: a request the state store cannot hold (too large, store down) is
	// refused here, before anything runs.
	if err := res.record(n.ctx, req); err != nil {
		if errors.Is(err, state.ErrValueTooLarge) {
			refuse(400, "workload not stored", fmt.Errorf("workload not started: its start request cannot be recorded in node state: %w", err))
		} else {
			// Said as such (before, "internal server error"): the operator looks at
			// JetStream (a full store, a cut-off server), a client tries another node.
			refuse(503, "workload not stored", &publicError{
				public: "the node's state store (JetStream) did not take the workload's record: it is full, failing or unreachable",
				err:    fmt.Errorf("record workload %s before starting it: %w", workloadID, err)})
		}
		return
	}

	st.Step("record")
	if testhold.Holds(n.o.TestHold, testhold.DeployRecorded) {
		n.log.Warn("test hold: a deploy recorded, its start not sent yet", "workload_id", workloadID, "hold", testhold.DeployRecorded)
		<-n.ctx.Done()
	}
	if err := n.ctx.Err(); err != nil {
		// Stopping (the record took that long): the start is not sent, so nothing runs
		// and the record goes. Before, the record was kept and the client told the next
		// start here would adopt or start the workload: a job its nexd SDK nexlet never
		// got is not held, and was dropped as one that ran (reconcile), never run
		// (TestStopDuringDeployRecordLeavesNoRecord).
		refuse(503, "node stopping", &publicError{
			public: fmt.Sprintf("node %s is stopping: the workload was not started; run it on another node", n.id),
			err:    fmt.Errorf("workload %s: the node stopped before it sent the start to nexlet %s: %w", workloadID, a.id, err)})
		return
	}
	call, err := n.startOnNexlet(a, workloadID, body)
	if err != nil {
		refuse(500, "nexlet did not start the workload", fmt.Errorf("start workload %s on nexlet %s (%s): %w", workloadID, a.id, a.req.Name, err))
		return
	}
	if call.handed != nil {
		n.mu.Lock()
		n.handableStarts[workloadID] = call // until commit or rollback
		n.mu.Unlock()
	}
	if r.Reply() != "" && r.Headers().Get(protocol.HeaderProgress) != "" {
		// The client (nexctl workload run) shows how the start goes: relay the reports.
		call.onProgress = func(h nats.Header) {
			m := &nats.Msg{Subject: r.Reply(), Header: nats.Header{protocol.HeaderProgress: {h.Get(protocol.HeaderProgress)}}}
			if b := h.Get(protocol.HeaderProgressBytes); b != "" {
				m.Header.Set(protocol.HeaderProgressBytes, b)
			}
			n.signReply(r, m)
			if err := n.o.NC.PublishMsg(m); err != nil {
				n.log.Debug("deploy progress report failed", "workload_id", workloadID, "err", err)
			}
		}
	}
	reply, waitErr := call.wait(n.ctx, n.o.StartTimeout, n.o.DeployTimeout)
	call.onProgress = nil // an abandoned start's late reports are nobody's business
	if errors.Is(waitErr, errHandedOver) {
		call.close()
		if res.commit(true) {
			n.forget(workloadID, req.WorkloadType)
		}
		deployed = true
		n.respondJSON(r, protocol.StartWorkloadResponse{ID: workloadID, Name: req.Name})
		n.log.Warn("workload deployed: its nexlet ended before it answered the start, and the nexlet's successor took the start over as a replay",
			"workload_id", workloadID, "name", req.Name, "namespace", req.Namespace, "type", req.WorkloadType, "agent_id", a.id)
		return
	}
	if waitErr != nil {
		n.abandonStart(r, res, call, waitErr)
		return
	}
	call.close()
	st.Step("nexlet") // its start and both hops
	if isErrorReply(reply) {
		// Relayed as the nexlet said it, and not kept: the nexlet did not run it.
		n.log.Info("nexlet refused workload", "workload_id", workloadID, "agent_id", a.id,
			"code", reply.Header.Get(protocol.HeaderErrorCode), "err", reply.Header.Get(protocol.HeaderError))
		if !n.rolledBack(r, res, fmt.Errorf("nexlet %s: %s", a.id, reply.Header.Get(protocol.HeaderError))) {
			return
		}
		reply.Header.Set(protocol.HeaderDeployOutcome, protocol.DeployNotStarted)
		n.relay(r, reply)
		return
	}
	if testhold.Holds(n.o.TestHold, testhold.DeployAnswered) {
		n.log.Warn("test hold: a deploy's start answered by its nexlet, not committed yet", "workload_id", workloadID, "hold", testhold.DeployAnswered)
		<-n.ctx.Done()
	}
	endedEarly := res.commit(true)
	if endedEarly {
		// The workload (a quick job) ended before it was committed: drop it again.
		n.forget(workloadID, req.WorkloadType)
	}
	deployed = true
	n.relay(r, reply)
	st.Step("reply")
	if !endedEarly {
		n.markStarted(res, req)
	}
	// After the reply: a log write (a journal socket under systemd) is no part of it.
	n.log.Info("workload deployed", "workload_id", workloadID, "name", req.Name, "namespace", req.Namespace,
		"type", req.WorkloadType, "agent_id", a.id)
	st.Log(n.log, "deploy steps", "workload_id", workloadID, "via", call.via)
}

// Bounds on the keep-alive interval a client may ask for (HeaderAlive).
const (
	minAliveInterval = 100 * time.Millisecond
	maxAliveInterval = 30 * time.Second
)

// keepAlive tells a client that asked for it (HeaderAlive) that the node holds its
// deploy: one body-less reply now and one per interval until the returned stop runs,
// so a client can tell a node that went away mid-request from a slow start.
func (n *Node) keepAlive(r micro.Request) (stop func()) {
	every, err := time.ParseDuration(r.Headers().Get(protocol.HeaderAlive))
	if err != nil || r.Reply() == "" {
		return func() {}
	}
	every = min(max(every, minAliveInterval), maxAliveInterval)
	say := func() {
		m := &nats.Msg{Subject: r.Reply(), Header: nats.Header{protocol.HeaderAlive: {"1"}}}
		n.signReply(r, m)
		if err := n.o.NC.PublishMsg(m); err != nil {
			n.log.Debug("deploy keep-alive failed", "subject", r.Subject(), "err", err)
		}
	}
	say()
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				say()
			}
		}
	}()
	return func() {
		close(done)
		<-exited
	}
}

// reservation is one deploy in flight: capacity held on a nexlet, the workload marked
// as starting, and once recorded, its state record. rollback undoes all of it unless
// commit ran; it is deferred right after reserve, so every early return is clean.
type reservation struct {
	n        *Node
	agent    *registration
	id, typ  string
	ns, name string
	recorded bool
	done     bool
}

// reserve picks the nexlet for a bid (or another healthy one of the type) and holds
// capacity on it. The error is a client error with its reply code.
func (n *Node) reserve(b bid, req protocol.StartWorkloadRequest, workloadID string) (*reservation, int, error) {
	now := time.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.lameduck.IsZero() || n.state == protocol.NodeStopping {
		return nil, 400, fmt.Errorf("node %s is in lameduck mode (stopping at %s) and accepts no new workloads; run a new auction", n.id, n.lameduck.UTC().Format(time.RFC3339))
	}
	a := n.agents[b.agentID]
	if a == nil || a.req.RegisterType != req.WorkloadType || n.health(a, now) != protocol.HealthHealthy ||
		!a.supports(req.WorkloadLifecycle) || a.full() {
		a, _ = n.pickAgentLocked(req.WorkloadType, req.WorkloadLifecycle, now)
	}
	if a == nil {
		_, why := n.pickAgentLocked(req.WorkloadType, req.WorkloadLifecycle, now)
		if other, _ := n.pickAgentLocked(req.WorkloadType, "", now); other == nil {
			return nil, 404, fmt.Errorf("workload type not found: %s on node %s", why.String(), n.id)
		}
		return nil, 400, fmt.Errorf("node %s cannot run this workload: %s", n.id, why.String())
	}
	a.startsInFlight++ // capacity held while the nexlet starts it
	n.starting[workloadID] = inFlight{owner: a.owner, ns: req.Namespace}
	for rr := range n.regReads {
		rr.ids[workloadID] = struct{}{}
	}
	n.changes.Add(1)
	return &reservation{n: n, agent: a, id: workloadID, typ: req.WorkloadType, ns: req.Namespace, name: req.Name}, 0, nil
}

// inFlight is a deploy in flight: the nexlet instance it went to (only that one may
// say it ended) and whether it did.
type inFlight struct {
	owner string
	ns    string // the workload's namespace, whose feeds the nexlet may speak in
	ended bool
}

// record writes the intent to node state, with the nexlet instance that runs it. A
// write that failed but may have landed (its answer lost: a timeout, the node's stop, a
// lost link) counts as recorded, so the rollback removes it: before, such a deploy was
// refused as not started (its client then tried another node) with the record left in
// node state, and the next replay here started a second copy
// (TestStopDuringDeployRecordLeavesNoRecord).
func (res *reservation) record(ctx context.Context, req protocol.StartWorkloadRequest) error {
	req.Owner, req.Memory = res.agent.owner, res.agent.req.Memory
	err := res.n.o.Store.Put(ctx, res.typ, res.id, req)
	res.recorded = err == nil || !state.NotWritten(err)
	return err
}

// markStarted marks a job's record as started once its nexlet answered, after the
// client's reply and off its path: a stored job its nexlet does not hold then ran
// (reconcile), also once the nexlet forgot it (a finished job kept an hour) while its
// record stayed (a removal that failed). Only a job sent to a nexlet that names its
// memory of starts needs it (for the others reconcile takes every stored job not held
// for one that ran, and starts every service). A nexd killed before the mark lands
// leaves the job to that memory, which holds it (TestDeployKilledAfterAnswerRunsOnce).
func (n *Node) markStarted(res *reservation, req protocol.StartWorkloadRequest) {
	if req.WorkloadLifecycle != protocol.LifecycleJob || res.agent.req.Memory == "" || !res.recorded {
		return
	}
	n.markLater(res, req)
}

// markLater writes markStarted's mark on a goroutine of the node's. Apart, so that
// the closure's copy of req is made only for a mark (a service's deploy allocates
// nothing for it).
func (n *Node) markLater(res *reservation, req protocol.StartWorkloadRequest) {
	req.Owner, req.Memory, req.Started = res.agent.owner, res.agent.req.Memory, true
	n.own("start mark of workload "+res.id, func() {
		// Retried: an unmarked record outlives this run's failure, and once the nexlet
		// forgot the finished job (an hour, 256 later ends) while nexd was down, the next
		// nexd would take it for a start that never arrived and run it again. A retry is
		// safe: MarkStarted reads the record again and writes only over what it read.
		delay := markRetryFirst
		for attempt := 1; ; attempt++ {
			ctx, cancel := context.WithTimeout(withNamespace(n.ctx, res.ns), rollbackWait)
			err := n.o.Store.MarkStarted(ctx, res.typ, res.id, req)
			cancel()
			if err == nil {
				return
			}
			if attempt == markAttempts || n.ctx.Err() != nil {
				n.log.Warn("a job's record not marked started; until its nexlet forgets the job (an hour after its end, or 256 ends later) its memory of starts still tells, after that the next nexd would run it again", "workload_id", res.id, "attempts", attempt, "err", err)
				return
			}
			n.log.Debug("a job's record not marked started; retrying", "workload_id", res.id, "attempt", attempt, "err", err)
			select {
			case <-n.ctx.Done():
			case <-time.After(delay):
			}
			delay = min(2*delay, markRetryMax)
		}
	})
}

// A start mark's retries: the first after markRetryFirst, doubling up to markRetryMax,
// markAttempts in all (about 4 minutes), and none past the node's stop.
const (
	markRetryFirst = 250 * time.Millisecond
	markRetryMax   = 30 * time.Second
	markAttempts   = 12
)

// commit keeps the workload: it is owned from now on. It reports whether the nexlet
// already said the workload ended while it was starting. answered: the nexlet answered
// the start (not a start the node gave up waiting for); the caller then removes a
// workload that ended early, so a WORKLOADSTOPPED of it meanwhile removes nothing
// (ownership.ended).
func (res *reservation) commit(answered bool) (endedEarly bool) {
	n := res.n
	n.mu.Lock()
	defer n.mu.Unlock()
	res.done = true
	n.changes.Add(1)
	res.agent.startsInFlight--
	res.agent.kept = append(res.agent.kept, time.Now()) // until a heartbeat counts it
	endedEarly = n.starting[res.id].ended
	n.owned[res.id] = ownership{typ: res.typ, owner: res.agent.owner, ns: res.ns, name: res.name, ended: endedEarly && answered}
	delete(n.renewed, res.id) // the deploy's user is the newest
	if answered && upstreamSDK(res.agent) {
		// Its answer to the start, on its own subject, says it runs it: a list that no
		// longer has it then says it ended (listends.go). A start given up on is
		// confirmed only by a list that has it: until then the nexlet may still be
		// starting it, and lists without it say nothing
		// (TestAbandonedUpstreamStartNotTakenAsEnded).
		res.agent.confirmLocked(res.id, n.listRound)
	}
	delete(n.starting, res.id)
	delete(n.handableStarts, res.id)
	return endedEarly
}

// rolledBack rolls a refused deploy back before its refusal is sent. When its record
// cannot be removed from node state, "not started" would not be definitive (the next
// nexd replays the record and starts the workload): it answers "outcome unknown"
// instead, naming both errors, and reports false (the reply is sent).
func (n *Node) rolledBack(r micro.Request, res *reservation, why error) bool {
	err := res.rollback()
	if err == nil {
		return true
	}
	n.fail(r, 500, "outcome of the start unknown", fmt.Errorf("workload %s was not started (%v), but its record could not be removed from node state, so the node may start it when it restarts (check 'nexctl workload list'): %w", res.id, why, err))
	return false
}

// rollback releases what the deploy held; after commit it does nothing. Its error is
// the state store's, when the recorded intent could not be deleted (retried briefly:
// a KV hiccup must not leave a refused deploy to be replayed).
func (res *reservation) rollback() error {
	if res.done {
		return nil
	}
	res.done = true
	n := res.n
	n.changes.Add(1)
	n.mu.Lock()
	res.agent.startsInFlight--
	delete(n.starting, res.id)
	delete(n.handableStarts, res.id)
	n.mu.Unlock()
	if !res.recorded {
		return nil
	}
	// Not cut short by the node's stop: a deploy refused as the node stops removes its
	// record too (bounded; a tombstone stands in for a removal the store refuses).
	ctx, cancel := context.WithTimeout(withNamespace(context.WithoutCancel(n.ctx), res.ns), rollbackWait)
	defer cancel()
	var err error
	for try := range 3 {
		if try > 0 {
			time.Sleep(time.Duration(try) * 100 * time.Millisecond)
		}
		if err = n.o.Store.Delete(ctx, res.typ, res.id); err == nil || errors.Is(err, ErrRemovalPending) {
			// A tombstone keeps it out of every replay, and its removal is retried.
			return nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	n.log.Warn("failed to remove the record of a workload that did not start", "workload_id", res.id, "err", err)
	return fmt.Errorf("remove the record of workload %s: %w", res.id, err)
}

// rollbackWait bounds a rollback's removal of the recorded intent.
const rollbackWait = 5 * time.Second

// startCall is one start request to a nexlet, answered on its own inbox (or call on the
// local channel) so the node can hear progress reports and a late answer.
type startCall struct {
	cancel func() // ends the subscription or the call
	ch     chan *nats.Msg
	via    string // "local" (channel) or "nats"
	// agent and handed, for a nexd nexlet (one that finds a start's launch record
	// again): the nexlet asked, and closed (by handOverStarts) once the nexlet's
	// process ended before it answered and its successor took the start as a replay.
	agent  *registration
	handed chan struct{}
	// ended (under the node's lock): the supervisor saw the process of the nexlet
	// asked over NATS end (RemoveAgent); a local channel says so itself.
	ended bool
	// onProgress passes the nexlet's progress reports on (to a client that asked).
	onProgress func(nats.Header)
}

// startOnNexlet sends the start request: on the local channel to the nexlet's process
// when it has one (a native nexlet this nexd spawned), else over NATS. A channel that
// is closed or fails to send falls back to NATS before anything was sent on it.
func (n *Node) startOnNexlet(a *registration, workloadID string, body []byte) (*startCall, error) {
	c := &startCall{ch: make(chan *nats.Msg, 64)}
	subject := protocol.StartWorkloadSubject(n.id, a.id, workloadID)
	hdr := nats.Header{protocol.HeaderProgress: {n.o.ProgressInterval.String()}}
	if a.local != nil && n.localStart() && a.local.Serving() {
		cancel, err := a.local.Request(subject, hdr, body, c.ch)
		if err == nil {
			c.cancel, c.via, c.agent, c.handed = cancel, "local", a, make(chan struct{})
			return c, nil
		}
		n.log.Debug("local channel to the nexlet failed; starting over NATS", "agent_id", a.id, "err", err)
	}
	inbox := newInbox(n.o.NC)
	sub, err := n.o.NC.ChanSubscribe(inbox, c.ch)
	if err != nil {
		return nil, fmt.Errorf("subscribe reply inbox: %w", err)
	}
	c.cancel, c.via = func() { _ = sub.Unsubscribe() }, "nats"
	if a.req.AnswersDirect {
		// Its successor finds what the start forked (the launch record), as on the
		// local channel; an upstream SDK nexlet's would start it a second time.
		c.agent, c.handed = a, make(chan struct{})
	}
	m := &nats.Msg{Subject: subject, Reply: inbox, Data: body, Header: hdr}
	if err := n.o.NC.PublishMsg(m); err != nil {
		c.close()
		return nil, fmt.Errorf("publish start request: %w", err)
	}
	return c, nil
}

func (c *startCall) close() { c.cancel() }

// nexletGoneLocked says whether the process of the nexlet asked has ended: its local
// channel's end, or for a start over NATS the supervisor's word. Call it with the
// node's lock held.
func (c *startCall) nexletGoneLocked() bool {
	return c.ended || c.agent.exited || c.via == "local" && c.agent.local.Gone()
}

// localStart says whether this start may go over a local channel (Options.LocalStarts).
func (n *Node) localStart() bool {
	switch n.o.LocalStarts {
	case "off":
		return false
	case "half":
		// At random, not alternating: strict alternation would pair each transport
		// with one of the v1 fork pool's two threads.
		return rand.IntN(2) == 0
	}
	return true
}

// errStartSilent and errStartTooLong say why the node stopped waiting for a start.
var (
	errStartSilent  = errors.New("the nexlet did not answer")
	errStartTooLong = errors.New("the nexlet was still starting it at deploy_timeout")
	errHandedOver   = errors.New("the nexlet ended before it answered; its successor took the start over")
)

// wait returns the nexlet's answer. It waits while the nexlet reports progress, at
// most silence between messages and total overall.
func (c *startCall) wait(ctx context.Context, silence, total time.Duration) (*nats.Msg, error) {
	deadline := time.NewTimer(total)
	defer deadline.Stop()
	quiet := time.NewTimer(silence)
	defer quiet.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline.C:
			return nil, fmt.Errorf("%w (%s)", errStartTooLong, total)
		case <-quiet.C:
			return nil, fmt.Errorf("%w within %s", errStartSilent, silence)
		case <-c.handed: // nil for an upstream SDK nexlet: never
			return nil, errHandedOver
		case m := <-c.ch:
			if isNoResponders(m) {
				return nil, errors.New("no nexlet listens for the start request")
			}
			if m.Header.Get(protocol.HeaderProgress) != "" && len(m.Data) == 0 && !isErrorReply(m) {
				quiet.Reset(silence)
				if c.onProgress != nil {
					c.onProgress(m.Header)
				}
				continue
			}
			return m, nil
		}
	}
}

// abandonStart handles a start the node stopped waiting for: it asks the nexlet to
// stop the workload. Stopped, the deploy is "not started"; otherwise the workload stays
// tracked (owned, recorded) and a late answer from the nexlet is still acted on, so
// nothing the node gave up on runs untracked.
func (n *Node) abandonStart(r micro.Request, res *reservation, call *startCall, why error) {
	var req protocol.StartWorkloadRequest
	_ = protocol.Decode(r.Data(), &req)
	if n.ctx.Err() != nil {
		call.close()
		n.leftAtStop(r, res, req, "before its nexlet answered the start", why)
		return
	}
	stop, err := n.stopWorkload(n.ctx, req.Namespace, res.id)
	if err == nil && stop.Stopped {
		call.close()
		if !n.rolledBack(r, res, why) { // before the refusal: see handleDeploy
			return
		}
		n.log.Warn("gave up on a workload start and stopped it", "workload_id", res.id, "agent_id", res.agent.id, "err", why)
		n.refuse(r, 408, "nexlet did not start the workload in time", fmt.Errorf("workload %s not started: %w; the node stopped it again", res.id, why))
		return
	}
	res.commit(false)
	n.log.Warn("gave up waiting for a workload start; it stays tracked and is stopped if it starts",
		"workload_id", res.id, "agent_id", res.agent.id, "err", why)
	n.fail(r, 408, "outcome of the start unknown", fmt.Errorf("workload %s: %w; it may still start, and the node will stop it if it does (check 'nexctl workload list')", res.id, why))
	late := n.own("abandoned start of workload "+res.id, func() {
		defer call.close()
		reply, err := call.wait(n.ctx, n.o.DeployTimeout, n.o.DeployTimeout)
		switch {
		case err != nil:
			n.log.Warn("an abandoned workload start never answered; its record is kept", "workload_id", res.id, "err", err)
		case isErrorReply(reply):
			n.forget(res.id, res.typ)
		default:
			if resp, err := n.stopWorkload(n.ctx, req.Namespace, res.id); err == nil && resp.Stopped {
				n.log.Info("stopped a workload that started after the node gave up on it", "workload_id", res.id)
				n.forget(res.id, res.typ)
			} else {
				n.log.Error("a workload started after the node gave up on it and did not stop; it stays tracked", "workload_id", res.id, "err", err, "message", resp.Message)
			}
		}
	})
	if !late {
		call.close() // the node is stopping: its record is kept, as above
	}
}

// leftAtStop answers a deploy the stopping node gives up on after it recorded the
// workload: it can neither stop the start nor wait for it. The record stays, so the
// next start on this state adopts the workload (its nexlet ran it) or starts it; the
// client hears that the outcome is unknown, never "not started".
func (n *Node) leftAtStop(r micro.Request, res *reservation, req protocol.StartWorkloadRequest, when string, why error) {
	res.commit(false)
	n.fail(r, 503, "node stopping: outcome of the start unknown", &publicError{
		public: fmt.Sprintf("node stopping: outcome of the start of workload %s unknown: the node stopped %s; the workload is recorded, so it may run, and this node adopts or starts it when it next starts (check 'nexctl workload list')", res.id, when),
		err: fmt.Errorf("workload %s (%s in %s, nexlet %s): node stopping %s; its record is kept for the next start: %w",
			res.id, req.Name, req.Namespace, res.agent.id, when, why)})
}

// artifactMinter is a Minter whose workload users have no JetStream grant
// (mint.SigningKeyMinter): a start that names a nats:// artifact gets a user of its
// own for the nexlet's fetch. The others' workload users fetch as before.
type artifactMinter interface {
	MintArtifactReader(namespace, workloadID string) (protocol.NatsConnectionData, error)
}

// mintArtifactReader mints the fetch user of a start whose run request names a
// nats:// artifact, or returns nil. Only such starts pay for the second user. Its
// grants are its namespace's buckets whatever the run request names.
func (n *Node) mintArtifactReader(req protocol.StartWorkloadRequest, workloadID string) (*protocol.NatsConnectionData, error) {
	am, ok := n.o.Minter.(artifactMinter)
	if !ok || !namesNATSArtifact(req.RunRequest) {
		return nil, nil
	}
	cd, err := am.MintArtifactReader(req.Namespace, workloadID)
	if err != nil {
		return nil, err
	}
	return &cd, nil
}

// namesNATSArtifact says whether a run request names a nats:// URI: as written, or
// as a string of its JSON once decoded (a client may escape it, "nats:\/\/b\/o" or
// "\u006eats://b/o", which its nexlet reads as nats://; before, such a start got
// no reader and its fetch was refused). Only a request with a backslash is decoded:
// without one no JSON string decodes to what the text does not hold.
func namesNATSArtifact(run string) bool {
	const scheme = "nats://"
	if strings.Contains(run, scheme) {
		return true
	}
	if !strings.Contains(run, `\`) {
		return false
	}
	var v any
	if json.Unmarshal([]byte(run), &v) != nil {
		return false
	}
	var walk func(any) bool
	walk = func(v any) bool {
		switch v := v.(type) {
		case string:
			return strings.Contains(v, scheme)
		case []any:
			return slices.ContainsFunc(v, walk)
		case map[string]any:
			for k, e := range v {
				if strings.Contains(k, scheme) || walk(e) {
					return true
				}
			}
		}
		return false
	}
	return walk(v)
}
