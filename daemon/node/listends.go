package node

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// A nexlet on upstream's SDK says a workload ended only with the WORKLOADSTOPPED event
// on $NEX.FEED, which the server refuses without allow_nexlet_direct_feeds: the node
// never heard its jobs end, and started each again at its next registration. The node
// hears those ends by listing it instead. Within one registration, a workload the
// nexlet itself said it runs (its answer to the start, or a list) and then no longer
// lists, in a round that is whole and checks out, has ended: it leaves node state as
// its WORKLOADSTOPPED would have made it (forget), and nothing is published. Across a
// registration nothing carries over: a restarted nexlet lost what it ran, and a
// workload it lacks then was killed by the crash, not ended (reconcile at
// registration decides about those).

// upstreamSDK says whether r is a nexlet whose ends the node hears only by listing it:
// it reports none as requests (WORKLOADENDED) and answers on the shared subjects only
// (upstream's SDK). nexd's nexlets report their ends and are never listed for them.
func upstreamSDK(r *registration) bool { return !r.req.ReportsEnded && !r.req.AnswersDirect }

// confirmLocked records that r itself said it runs workload id (under the node's lock),
// as of list round round (a round already under way does not count it as missing).
func (r *registration) confirmLocked(id string, round uint64) {
	if r.confirmed == nil {
		r.confirmed = map[string]uint64{}
	}
	if _, ok := r.confirmed[id]; !ok {
		r.confirmed[id] = round
	}
}

// replayListDelay is how long after a kick (kickEnds) a round starts: the SDK starts
// its replays right after its first heartbeat.
const replayListDelay = 500 * time.Millisecond

// kickEnds asks for a round soon: a nexlet on upstream's SDK that was handed workloads
// to replay sent its first heartbeat. A replayed job confirmed by no list before it
// ends would stay in node state and run again at the next registration.
func (n *Node) kickEnds() {
	select {
	case n.endsKick <- struct{}{}:
	default:
	}
}

// endsLoop lists the nexlets on upstream's SDK that hold workloads in node state, one
// round each EndsListInterval and one replayListDelay after a kick; a round takes at
// most FanoutTimeout.
func (n *Node) endsLoop() {
	defer n.loops.Done()
	t := time.NewTicker(n.o.EndsListInterval)
	defer t.Stop()
	var soon <-chan time.Time
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-n.endsKick:
			soon = time.After(replayListDelay)
		case <-soon:
			soon = nil
			n.listEnds(n.ctx)
		case <-t.C:
			n.listEnds(n.ctx)
		}
	}
}

// listEnds is one round: every nexlet asked on the shared subject is listed there (any
// of them may answer there, in any name), and each is pinged on its own subject, which
// only it may answer: its workload_count is the one word in the round known to be its
// own. A nexlet's confirmed workload that no answer lists is taken as ended only when
// the round is whole (as many answers as nexlets asked, none an error, no workload
// listed twice), the nexlet answered its ping, and its count equals the number of its
// workloads the answers list: a hung nexlet whose list another's answer stands in for
// still counts the workload that list leaves out (TestRogueUpstreamNexletHidesAnothersWorkload).
func (n *Node) listEnds(ctx context.Context) {
	defer n.endRounds.Add(1)
	n.mu.Lock()
	if n.keep || n.drained || n.state == protocol.NodeStopping || !n.o.NC.IsConnected() {
		n.mu.Unlock()
		return
	}
	holding := map[string]bool{} // owners with workloads in node state
	for _, o := range n.owned {
		holding[o.owner] = true
	}
	pool := map[string]*registration{}
	var watched []*registration
	now := time.Now()
	for id, r := range n.agents {
		if r.req.AnswersDirect {
			continue
		}
		if r.lastBeat.IsZero() {
			n.mu.Unlock()
			return // not serving yet: its answer would be missing
		}
		pool[id] = r
		switch {
		case upstreamSDK(r) && holding[r.owner]:
			watched = append(watched, r)
		case !r.stall.since.IsZero():
			n.roundWholeLocked(r, now, false) // nothing of it to hear
		}
	}
	if len(watched) == 0 {
		n.mu.Unlock()
		return
	}
	n.listRound++
	round := n.listRound
	n.mu.Unlock()
	ans, err := n.askPool(ctx, pool)
	if err != nil {
		n.log.Debug("listing nexlets for ended workloads failed", "err", err)
		if ctx.Err() == nil {
			n.roundNotWhole(watched, checkAskFailed, err.Error())
		}
		return
	}
	n.settleEnds(round, len(pool), watched, ans)
}

// poolAnswer is what one round heard.
type poolAnswer struct {
	replies int                          // on the shared subject, all of them
	bad     int                          // of those: errors, no responders, lists that do not decode
	lists   [][]protocol.WorkloadSummary // the others, at most maxPoolReplies
	counts  map[string]int               // agent id -> workload_count of its own ping answer
}

// askPool lists the nexlets of pool on the shared subject and pings each on its own,
// and returns what came within FanoutTimeout (waited out in full, so that more answers
// than nexlets asked are seen).
func (n *Node) askPool(ctx context.Context, pool map[string]*registration) (poolAnswer, error) {
	body, err := protocol.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})
	if err != nil {
		return poolAnswer{}, err
	}
	var (
		mu     sync.Mutex
		closed bool
		ans    = poolAnswer{counts: map[string]int{}}
		pinged = map[string]bool{} // first ping answer only
	)
	maxKept := 2*len(pool) + 1
	listInbox := newInbox(n.o.NC)
	lsub, err := n.o.NC.Subscribe(listInbox, func(m *nats.Msg) {
		var list []protocol.WorkloadSummary
		bad := isErrorReply(m) || isNoResponders(m) || jsonArray(m.Data, &list) != nil
		mu.Lock()
		defer mu.Unlock()
		if closed {
			return
		}
		ans.replies++
		switch {
		case bad:
			ans.bad++
		case len(ans.lists) < maxKept:
			ans.lists = append(ans.lists, list)
		}
	})
	if err != nil {
		return poolAnswer{}, fmt.Errorf("subscribe list inbox: %w", err)
	}
	defer func() { _ = lsub.Unsubscribe() }()
	pingInbox := newInbox(n.o.NC)
	byToken := make(map[string]string, len(pool)) // read-only once subscribed
	for id := range pool {
		tok, err := replyToken()
		if err != nil {
			return poolAnswer{}, err
		}
		byToken[tok] = id
	}
	psub, err := n.o.NC.Subscribe(pingInbox+".*", func(m *nats.Msg) {
		id := byToken[protocol.LastToken(m.Subject)]
		var s struct {
			Count *int `json:"workload_count"`
		}
		ok := !isErrorReply(m) && !isNoResponders(m) && json.Unmarshal(m.Data, &s) == nil && s.Count != nil
		mu.Lock()
		defer mu.Unlock()
		if closed || id == "" || pinged[id] {
			return
		}
		pinged[id] = true
		if ok {
			ans.counts[id] = *s.Count
		}
	})
	if err != nil {
		return poolAnswer{}, fmt.Errorf("subscribe ping inbox: %w", err)
	}
	defer func() { _ = psub.Unsubscribe() }()
	// HeaderAskedDirect: a nexd nexlet leaves it (the node asks those on their own
	// subjects, and this round asks none of them).
	if err := n.o.NC.PublishMsg(&nats.Msg{Subject: protocol.QueryWorkloadsSubject(n.id), Reply: listInbox, Data: body,
		Header: nats.Header{protocol.HeaderAskedDirect: {"1"}}}); err != nil {
		return poolAnswer{}, fmt.Errorf("publish %s: %w", protocol.QueryWorkloadsSubject(n.id), err)
	}
	for tok, id := range byToken {
		if err := n.o.NC.PublishRequest(protocol.PingAgentSubject(n.id, id), pingInbox+"."+tok, nil); err != nil {
			return poolAnswer{}, fmt.Errorf("publish %s: %w", protocol.PingAgentSubject(n.id, id), err)
		}
	}
	t := time.NewTimer(n.o.FanoutTimeout)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return poolAnswer{}, ctx.Err()
	case <-t.C:
	}
	mu.Lock()
	defer mu.Unlock()
	closed = true
	return ans, nil
}

// roundNotWhole records a round that failed the shared subject's checks (or was not
// asked) for the nexlets it watched that are still registered so.
func (n *Node) roundNotWhole(watched []*registration, failed listCheck, detail string) {
	n.countChecks(failed)
	now := time.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, r := range watched {
		if n.agents[r.id] == r {
			n.roundNotWholeLocked(r, failed, detail, now)
		}
	}
}

// settleEnds applies one round's answer to the nexlets it watched (see listEnds).
func (n *Node) settleEnds(round uint64, asked int, watched []*registration, ans poolAnswer) {
	listed := map[string]int{}
	for _, l := range ans.lists {
		for _, w := range l {
			listed[w.ID]++
		}
	}
	twice := 0
	for _, c := range listed {
		if c > 1 {
			twice++
		}
	}
	var failed listCheck
	switch {
	case ans.replies < asked:
		failed |= checkAnswersMissing
	case ans.replies > asked:
		failed |= checkAnswersExtra
	}
	if ans.bad > 0 {
		failed |= checkAnswerFailed
	}
	if twice > 0 {
		failed |= checkListedTwice
	}
	if failed != 0 {
		// Partial, failed or not its nexlets' own: nothing is confirmed or ended.
		n.log.Debug("nexlet list for ended workloads not whole; nothing taken from it",
			"asked", asked, "answers", ans.replies, "failed", ans.bad, "listed_twice", twice)
		n.roundNotWhole(watched, failed, fmt.Sprintf("%d nexlet(s) asked on the shared subject, %d answer(s), %d failed, %d workload(s) listed twice",
			asked, ans.replies, ans.bad, twice))
		return
	}
	type end struct {
		id, typ, ns string
		r           *registration
	}
	var ends []end
	now := time.Now()
	n.mu.Lock()
	if n.keep {
		n.mu.Unlock()
		return
	}
	for _, r := range watched {
		if n.agents[r.id] != r {
			continue // registered again (or gone) meanwhile: nothing carries over
		}
		count, ok := ans.counts[r.id]
		if !ok {
			n.log.Debug("nexlet did not answer its ping; its ends wait for the next list", "agent_id", r.id)
			n.countChecks(checkNoPing)
			n.roundNotWholeLocked(r, checkNoPing, "no answer to its own ping", now)
			continue
		}
		var mine []string
		for id := range listed {
			if o, ok := n.owned[id]; ok && o.owner == r.owner {
				mine = append(mine, id)
			}
		}
		if count != len(mine) {
			n.log.Debug("nexlet's own count differs from its workloads listed; its ends wait for the next list",
				"agent_id", r.id, "count", count, "listed", len(mine))
			n.countChecks(checkCount)
			n.roundNotWholeLocked(r, checkCount, fmt.Sprintf("its own count %d, %d of its workloads listed", count, len(mine)), now)
			continue
		}
		n.roundWholeLocked(r, now, true)
		for _, id := range mine {
			r.confirmLocked(id, round)
		}
		for id, at := range r.confirmed {
			o, ok := n.owned[id]
			if !ok || o.owner != r.owner || o.ended {
				delete(r.confirmed, id) // stopped, ended or taken over otherwise
				continue
			}
			if at >= round || listed[id] > 0 {
				continue
			}
			if _, ok := n.stopped.Get(id, protocol.SystemNamespace, now); ok || n.stopsInFlight[id] > 0 {
				// A stop ended it, or is ending it (a nexlet may drop a workload from
				// its list before it answers the stop): the stop removes it
				// (TestUpstreamStopInFlightRemovedOnce).
				continue
			}
			delete(r.confirmed, id)
			o.ended = true // its WORKLOADSTOPPED, if the server lets it through, removes nothing more
			n.owned[id] = o
			ends = append(ends, end{id: id, typ: o.typ, ns: o.ns, r: r})
		}
	}
	n.mu.Unlock()
	for _, e := range ends {
		// As its WORKLOADSTOPPED would: the same removal (a tombstone if it fails,
		// logged by unstore), nothing published.
		if n.forget(e.id, e.typ) == nil {
			n.log.Info("workload ended: its nexlet (upstream's SDK) no longer lists it; removed from node state",
				"workload_id", e.id, "namespace", e.ns, "type", e.typ, "agent_id", e.r.id, "name", e.r.req.Name)
		}
	}
}
