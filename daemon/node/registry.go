package node

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// registration is one registered nexlet.
type registration struct {
	id           string
	owner        string        // stable identity: "local:<supervised name>" or "remote:<name>"
	key          string        // public key its registration was signed with ("" unsigned); signs its renewals
	direct       bool          // its user may publish on every $NEX.FEED (directFeeds); renewals keep that
	life         time.Duration // lifetime of the user its registration got (0: none expires); bounds its renewals
	req          protocol.RegisterAgentRequest
	schema       *startSchema
	bid          []byte // bidStatic of its bids, made at its first (under the node's lock)
	registeredAt time.Time
	lastSeen     time.Time // registration or last heartbeat: the age health counts from
	lastBeat     time.Time // zero until the first heartbeat
	summary      protocol.AgentSummary
	// kept holds when each deploy kept since the last heartbeat was kept, so capacity
	// checks do not wait 10 s for the nexlet to report them; startsInFlight counts
	// the deploys sent and not yet kept or rolled back, which no heartbeat clears: a
	// heartbeat taken before the nexlet had the start does not count it. Nor does one
	// taken before and handled after the start was kept (beat).
	kept           []time.Time
	startsInFlight int
	reported       string // health last logged, so each change is logged once
	// local is the direct channel to this registration's nexlet process (nil: NATS).
	local *localchan.Client
	// exited (under the node's lock): the supervisor saw this nexlet's process end
	// (RemoveAgent), so a start a deploy sends it afterwards gets no answer either.
	exited bool
	// confirmed (under the node's lock; upstream's SDK only, see listends.go): the
	// workloads this registration itself said it runs, by its answer to their start or
	// a list, with the list round they were confirmed in.
	confirmed map[string]uint64
	// replays counts the workloads its registration handed it to start again.
	replays int
	// stall (under the node's lock; upstream's SDK only): its list rounds since the
	// last whole one (listhealth.go).
	stall listStall
}

func (r *registration) workloadCount() int {
	return r.summary.WorkloadCount + len(r.kept) + r.startsInFlight
}

func (r *registration) supports(l protocol.Lifecycle) bool {
	// A nexlet that declares no lifecycles is taken to accept any.
	return len(r.req.SupportedLifecycles) == 0 || slices.Contains(r.req.SupportedLifecycles, l)
}

func (r *registration) full() bool {
	return r.req.MaxWorkloads > 0 && float64(r.workloadCount()) >= r.req.MaxWorkloads
}

// health follows upstream: a fresh heartbeat's state decides; silence longer than
// DegradedAfter degrades, longer than OfflineAfter takes the nexlet offline.
func (n *Node) health(r *registration, now time.Time) string {
	age := now.Sub(r.lastSeen)
	switch {
	case age > n.o.OfflineAfter:
		return protocol.HealthOffline
	case age > n.o.DegradedAfter:
		return protocol.HealthDegraded
	case r.lastBeat.IsZero():
		return protocol.HealthUnknown
	}
	switch r.summary.State {
	case "running":
		return protocol.HealthHealthy
	case "error", "starting":
		return protocol.HealthDegraded
	case "lameduck", "stopping":
		return protocol.HealthShuttingDown
	}
	return protocol.HealthUnknown
}

// AgentInfo describes one registered nexlet.
type AgentInfo struct {
	ID                  string
	Name                string
	Type                string
	Version             string
	Health              string
	RegisteredAt        time.Time
	LastHeartbeat       time.Time // zero before the first heartbeat
	Summary             protocol.AgentSummary
	WorkloadCount       int
	MaxWorkloads        int
	SupportedLifecycles []protocol.Lifecycle
	// EndsUnheard is set while the node does not hear the nexlet's workload ends (an
	// upstream-SDK nexlet whose list rounds are not whole; listhealth.go).
	EndsUnheard *protocol.EndsUnheard
}

// Agents lists the registered nexlets, sorted by name then id.
func (n *Node) Agents() []AgentInfo {
	now := time.Now()
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]AgentInfo, 0, len(n.agents))
	for _, r := range n.agents {
		out = append(out, AgentInfo{
			ID: r.id, Name: r.req.Name, Type: r.req.RegisterType, Version: r.req.Version,
			Health: n.health(r, now), RegisteredAt: r.registeredAt, LastHeartbeat: r.lastBeat,
			Summary: n.summaryOf(r), WorkloadCount: r.workloadCount(),
			MaxWorkloads: int(r.req.MaxWorkloads), SupportedLifecycles: slices.Clone(r.req.SupportedLifecycles),
			EndsUnheard: r.endsUnheardLocked(),
		})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// summaryOf is the nexlet's last heartbeat summary, filled from its registration
// before the first heartbeat so `node info` shows something useful at once.
func (n *Node) summaryOf(r *registration) protocol.AgentSummary {
	s := r.summary
	if s.Name == "" {
		s.Name = r.req.Name
	}
	if s.Type == "" {
		s.Type = r.req.RegisterType
	}
	if s.Version == "" {
		s.Version = r.req.Version
	}
	if s.SupportedLifecycles == "" {
		ls := make([]string, len(r.req.SupportedLifecycles))
		for i, l := range r.req.SupportedLifecycles {
			ls[i] = string(l)
		}
		s.SupportedLifecycles = strings.Join(ls, ",")
	}
	if s.StartTime.IsZero() {
		s.StartTime = r.registeredAt.UTC()
	}
	s.WorkloadCount = r.workloadCount()
	return s
}

func (n *Node) summariesLocked(now time.Time) []protocol.NodeAgentSummary {
	out := make([]protocol.NodeAgentSummary, 0, len(n.agents))
	for _, r := range n.agents {
		h := n.health(r, now)
		s := protocol.NodeAgentSummary{
			AgentHealth: h, AgentHealthStoplight: protocol.Stoplight(h), AgentID: r.id,
			AgentLastHeartbeatTime: r.lastBeat.UTC(), AgentSummary: n.summaryOf(r),
			MaxWorkloads: int(r.req.MaxWorkloads),
		}
		if p, ok := n.procInfo[r.id]; ok {
			s.Restarts, s.LastExit = p.restarts, p.lastExit
		}
		s.EndsUnheard = r.endsUnheardLocked()
		out = append(out, s)
	}
	// A local nexlet the supervisor gave up on has no registration; show it offline.
	for id, p := range n.procInfo {
		if _, registered := n.agents[id]; registered || !p.failed {
			continue
		}
		out = append(out, protocol.NodeAgentSummary{
			AgentHealth: protocol.HealthOffline, AgentHealthStoplight: protocol.Stoplight(protocol.HealthOffline),
			AgentID: id, AgentSummary: protocol.AgentSummary{Name: n.expected[id], State: "failed"},
			Restarts: p.restarts, LastExit: p.lastExit,
		})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].AgentSummary.Name != out[j].AgentSummary.Name {
			return out[i].AgentSummary.Name < out[j].AgentSummary.Name
		}
		return out[i].AgentID < out[j].AgentID
	})
	return out
}

// registrationsLocked renders the heartbeat's "<id> [<type>], …" list, sorted.
func (n *Node) registrationsLocked() string {
	parts := make([]string, 0, len(n.agents))
	for id, r := range n.agents {
		parts = append(parts, fmt.Sprintf("%s [%s]", id, r.req.RegisterType))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func (n *Node) agentCount() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.agents)
}

// pickAgent returns the healthy nexlet of workloadType with the fewest workloads that
// can take one more of lifecycle l ("" = any), or why there is none: the reason and the
// nexlet it is about (pickRefusal words them). Nothing is formatted here: an auction
// the node does not bid on costs no allocation.
func (n *Node) pickAgentLocked(workloadType string, l protocol.Lifecycle, now time.Time) (*registration, pickRefusal) {
	var best *registration
	why := pickRefusal{reason: noBidNoNexlet, typ: workloadType, l: l}
	for _, r := range n.agents {
		if r.req.RegisterType != workloadType || n.health(r, now) != protocol.HealthHealthy {
			continue
		}
		if l != "" && !r.supports(l) {
			why.reason, why.r = noBidLifecycle, r
			continue
		}
		if r.full() {
			why.reason, why.r = noBidMaxWorkloads, r
			continue
		}
		if best == nil || r.workloadCount() < best.workloadCount() || (r.workloadCount() == best.workloadCount() && r.id < best.id) {
			best = r
		}
	}
	return best, why
}

// pickRefusal is why pickAgentLocked found no nexlet.
type pickRefusal struct {
	reason noBid
	r      *registration // the last nexlet of the type that could not take it
	typ    string
	l      protocol.Lifecycle
}

func (p pickRefusal) String() string {
	switch p.reason {
	case noBidLifecycle:
		return fmt.Sprintf("nexlet %q of type %q does not support lifecycle %q (supports %v)", p.r.req.Name, p.typ, p.l, p.r.req.SupportedLifecycles)
	case noBidMaxWorkloads:
		return fmt.Sprintf("nexlet %q of type %q is at its max_workloads (%d)", p.r.req.Name, p.typ, int(p.r.req.MaxWorkloads))
	}
	return fmt.Sprintf("no healthy nexlet of type %q", p.typ)
}

func (n *Node) totalWorkloadsLocked() int {
	t := 0
	for _, r := range n.agents {
		t += r.workloadCount()
	}
	return t
}

// ExpectAgent tells the node that the daemon started (or restarts) a local nexlet
// under agentID with this name. Without remote registration, only expected ids may
// register. The name is reserved for it (see boundLocked), and so are names, those it
// will register under as far as the daemon knows (the native nexlet's, those it
// registered under in earlier runs), from now on, and each name it registers under;
// a later agentID for the same name takes them over. A name reserved already stays
// its first holder's, and one listed in remote_nexlets is that remote nexlet's (a
// record kept before nameFree refused it).
func (n *Node) ExpectAgent(agentID, name string, names ...string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.expected[agentID] = name
	n.current[name] = agentID
	for i, b := range append([]string{name}, names...) {
		if _, ok := n.bound[b]; !ok && b != "" && (i == 0 || !n.listedRemote(b)) {
			n.bound[b] = name
		}
	}
}

// listedRemote reports whether name is listed for a remote nexlet (remote_nexlets).
func (n *Node) listedRemote(name string) bool {
	return slices.ContainsFunc(n.o.RemoteNexlets, func(rn RemoteNexlet) bool { return rn.Name == name })
}

// SetAgentProcessInfo records what the supervisor knows about the local nexlet with
// agentID (restarts, the last exit, whether it was given up), shown as nexd extensions
// in node info; a failed nexlet is listed offline even without a registration.
func (n *Node) SetAgentProcessInfo(agentID string, restarts int, lastExit string, failed bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.procInfo[agentID] = procInfo{restarts: restarts, lastExit: lastExit, failed: failed}
}

// RemoveAgent drops a registration (the supervisor saw the nexlet exit) and emits
// AGENTSTOPPED. Unknown ids are ignored.
func (n *Node) RemoveAgent(agentID, reason string) {
	n.mu.Lock()
	r, ok := n.agents[agentID]
	if ok {
		r.exited = true // for a deploy that chose it and has not sent its start yet
		n.removeLocked(agentID)
	}
	for _, c := range n.handableStarts {
		// Its process is gone: no answer comes to a start sent to it over NATS, and
		// its successor may take the start over.
		if c.agent != nil && c.agent.id == agentID {
			c.ended = true
		}
	}
	n.mu.Unlock()
	if ok {
		n.agentStopped(r, reason)
	}
}

func (n *Node) removeLocked(agentID string) {
	delete(n.agents, agentID)
	n.notifyLocked()
}

func (n *Node) notifyLocked() {
	close(n.changed)
	n.changed = make(chan struct{})
}

func (n *Node) agentStopped(r *registration, reason string) {
	n.log.Info("nexlet registration removed", "agent_id", r.id, "name", r.req.Name, "type", r.req.RegisterType, "reason", reason)
	n.o.Emitter.Emit(n.id, protocol.EventAgentStopped, protocol.AgentStoppedEvent{
		ID: r.id, Name: r.req.Name, Reason: reason, Timestamp: time.Now().UTC(),
	})
}

// WaitForAgents waits until the local nexlets with agent ids ids (those the daemon
// announced with ExpectAgent) are registered, or ctx ends; it returns the ids still
// missing.
func (n *Node) WaitForAgents(ctx context.Context, ids []string) []string {
	return n.waitAgents(ctx, ids, func(*registration) bool { return true })
}

// WaitServing waits until the local nexlets with agent ids ids are registered and have
// sent their first heartbeat, or ctx ends; it returns the ids of those that have not. A
// registration is answered before its nexlet serves: it connects with the credentials
// of the reply, subscribes its endpoints, then sends that heartbeat, and only then has
// a health (unknown before: no bid). The daemon holds READY for it (after
// WaitForAgents, with the ids that registered), so that a client auctioning once at
// READY, as upstream's does, gets a bid.
func (n *Node) WaitServing(ctx context.Context, ids []string) []string {
	return n.waitAgents(ctx, ids, func(r *registration) bool { return !r.lastBeat.IsZero() })
}

// waitAgents waits until each of ids has a registration that is done, or ctx ends; it
// returns those that have none. Only the registration under the id itself counts, and
// only one authorize took for the local nexlet nexd announced under it (its owner,
// local:<name>: signed with the key of that nexlet's start, or on its channel), never
// one by a registered name: a registered name is the nexlet's to choose, and a rogue
// one (a remote nexlet listed under that string, or another local nexlet) registering
// under a local nexlet's agent id as its name made READY come before that nexlet
// registered, and left it out of STATUS's "not registered".
func (n *Node) waitAgents(ctx context.Context, ids []string, done func(*registration) bool) []string {
	for {
		n.mu.Lock()
		var missing []string
		for _, id := range ids {
			r, ok := n.agents[id]
			name, expected := n.expected[id]
			if !ok || !expected || r.owner != "local:"+name || !done(r) {
				missing = append(missing, id)
			}
		}
		ch := n.changed
		n.mu.Unlock()
		if len(missing) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return missing
		case <-ch:
		}
	}
}

// onHeartbeat handles $NEX.SVC.<node>.agent.HEARTBEAT.<agentId>.
func (n *Node) onHeartbeat(m *nats.Msg) {
	agentID := protocol.LastToken(m.Subject)
	var hb protocol.AgentHeartbeat
	if err := protocol.Decode(m.Data, &hb); err != nil {
		n.log.Warn("ignoring malformed nexlet heartbeat", "agent_id", agentID, "err", err)
		return
	}
	now := time.Now()
	n.mu.Lock()
	r, ok := n.agents[agentID]
	var before, after string
	if ok {
		if r.lastBeat.IsZero() {
			n.notifyLocked() // it serves now: a list waiting for it goes ahead (awaitServing)
			if upstreamSDK(r) && r.replays > 0 {
				n.kickEnds() // confirm its replays before a short job among them ends
			}
		}
		r.lastSeen, r.lastBeat = now, now
		if r.summary.WorkloadCount != hb.Summary.WorkloadCount || len(r.kept) != 0 {
			n.changes.Add(1)
		}
		r.kept = keptAfterBeat(r.kept, r.summary.WorkloadCount, hb.Summary.WorkloadCount, now)
		r.summary = hb.Summary
		before, after = r.reported, n.health(r, now)
		r.reported = after
	}
	n.mu.Unlock()
	if !ok {
		n.log.Debug("heartbeat from an unregistered nexlet", "agent_id", agentID)
		return
	}
	if before != after {
		n.log.Info("nexlet health changed", "agent_id", agentID, "name", r.req.Name, "from", before, "to", after)
		n.emitHealth(agentID, r.req.Name, before, after, now)
	}
}

// emitHealth publishes a nexlet's health change (a nexd event; upstream has none).
func (n *Node) emitHealth(agentID, name, from, to string, at time.Time) {
	n.o.Emitter.Emit(n.id, protocol.EventAgentHealthChanged, protocol.AgentHealthChangedEvent{
		ID: agentID, Name: name, From: from, To: to, Timestamp: at.UTC()})
}

// sweep removes registrations that have been offline for RemoveOfflineAfter, forgets
// expired bids and logs health changes caused by silence.
func (n *Node) sweep(now time.Time) {
	var gone []*registration
	type change struct {
		r        *registration
		from, to string
	}
	var changes []change
	connected := n.o.NC.IsConnected()
	n.mu.Lock()
	if !connected {
		n.deaf = now
	}
	for id, r := range n.agents {
		// A registration is removed for silence the node could have heard: an outage of
		// the node's own NATS (of any length) removes no nexlet and so loses no workload.
		seen := r.lastSeen
		if n.deaf.After(seen) {
			seen = n.deaf
		}
		if n.o.RemoveOfflineAfter >= 0 && now.Sub(seen) > n.o.OfflineAfter+n.o.RemoveOfflineAfter {
			gone = append(gone, r)
			n.removeLocked(id)
			continue
		}
		if h := n.health(r, now); h != r.reported {
			changes = append(changes, change{r, r.reported, h})
			r.reported = h
		}
	}
	n.bids.sweep(now)
	n.mu.Unlock()
	for _, c := range changes {
		n.log.Warn("nexlet health changed", "agent_id", c.r.id, "name", c.r.req.Name, "from", c.from, "to", c.to,
			"last_heartbeat", c.r.lastBeat)
		n.emitHealth(c.r.id, c.r.req.Name, c.from, c.to, now)
	}
	for _, r := range gone {
		n.agentStopped(r, fmt.Sprintf("offline: no heartbeat since %s", r.lastSeen.UTC().Format(time.RFC3339)))
	}
}

// staleBeatLag bounds how long after a deploy was kept a heartbeat may come that the
// nexlet took before it had the start (e2e TestFullNexletStaleHeartbeat judges its
// rounds by it: nodeStaleBeatLag).
const staleBeatLag = 5 * time.Second

// keptAfterBeat is what of kept (the deploys kept since the last heartbeat, when) a
// heartbeat counting count workloads leaves to count, the last one having counted
// before. A heartbeat and a start's answer travel apart (NATS subjects the node reads
// on separate goroutines; TestStaleHeartbeatAfterStart): one that counts fewer than
// before plus kept may have been taken before a start the node kept a moment ago,
// and a nexlet at its max would then bid again. The deploys kept within staleBeatLag
// stay counted, as many as the heartbeat lacks (workloads that ended meanwhile make
// it lack them too: over-counted until the next heartbeat, the safe side).
func keptAfterBeat(kept []time.Time, before, count int, now time.Time) []time.Time {
	lacks := before + len(kept) - count
	if lacks <= 0 {
		return nil
	}
	var recent []time.Time
	for _, t := range kept {
		if now.Sub(t) < staleBeatLag {
			recent = append(recent, t)
		}
	}
	return recent[max(0, len(recent)-lacks):]
}
