package node

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestWaitServingHoldsForFirstHeartbeat: the daemon sends READY once WaitServing
// returns for its local nexlets, so WaitServing must not return before a registered
// nexlet's first heartbeat (until then its health is unknown and the node does not bid),
// and once it has returned, one auction gets the bid with no wait. A registration is no
// heartbeat: a nexlet that registers and then sends nothing stays unknown, degrades
// and goes offline on the usual timeouts, and never bids.
//
// The silence is the test's, not the machine's: the timeouts are far longer than the
// test runs, so no health changes on its own while the test looks (with 2 s and 3 s, a
// loaded machine could degrade the registration before its first look, or let the 1 s
// degraded window pass between two looks), and the hung nexlet's silence is made by
// dating its last word back (silentFor). The node's own health sweep reports each
// change (its events), unknown, degraded, offline, none skipped.
func TestWaitServingHoldsForFirstHeartbeat(t *testing.T) {
	const degradedAfter, offlineAfter = 10 * time.Minute, 20 * time.Minute
	events := &healthEvents{}
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.DegradedAfter = degradedAfter
		o.OfflineAfter = offlineAfter
		o.RemoveOfflineAfter = -1
		o.Emitter = events
	})
	n := f.nodes[0]
	health := func(id string) string {
		for _, ai := range n.Agents() {
			if ai.ID == id {
				return ai.Health
			}
		}
		return "removed"
	}
	// want: how many bids to wait for (none: 300 ms of quiet).
	bids := func(id string, want int) int {
		return len(f.auction("tenant", protocol.AuctionRequest{AuctionID: id, AgentType: "native"}, want))
	}
	// silentFor makes nexlet id's last word (its registration: it sent nothing else)
	// d ago, as if it had been silent that long.
	silentFor := func(id string, d time.Duration) {
		n.mu.Lock()
		defer n.mu.Unlock()
		r := n.agents[id]
		if r == nil {
			t.Fatalf("%s not registered", id)
		}
		if !r.lastBeat.IsZero() {
			t.Fatalf("%s sent a heartbeat", id)
		}
		r.lastSeen = time.Now().Add(-d)
	}

	// registerSilent registers a nexlet that sends nothing more: no heartbeat, no
	// endpoints (the fake only sends its REGISTER).
	registerSilent := func(id, name, typ string) *fakeAgent {
		n.ExpectAgent(id, name)
		a := newFakeAgent(t, f.srv, n.ID(), id, name, typ)
		if m := a.send(protocol.RegisterSubject(n.ID(), id), mustJSON(t, a.req)); m.Header.Get(protocol.HeaderErrorCode) != "" {
			t.Fatalf("register %s: %s", id, m.Data)
		}
		return a
	}

	a := registerSilent("agent0", "go_exec", "native")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if missing := n.WaitForAgents(ctx, []string{"agent0"}); len(missing) != 0 {
		t.Fatalf("not registered: %v", missing)
	}
	short, cancelShort := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancelShort()
	if silent := n.WaitServing(short, []string{"agent0"}); !slices.Equal(silent, []string{"agent0"}) {
		t.Fatalf("WaitServing before any heartbeat = %v, want [agent0]", silent)
	}
	if h := health("agent0"); h != protocol.HealthUnknown {
		t.Fatalf("health before the first heartbeat: %s, want %s", h, protocol.HealthUnknown)
	}
	if got := bids("before", 0); got != 0 {
		t.Fatalf("%d bids before the first heartbeat, want 0", got)
	}

	// The first heartbeat ends the wait; an auction right after gets the bid.
	served := make(chan []string, 1)
	go func() { served <- n.WaitServing(ctx, []string{"agent0"}) }()
	b, _ := json.Marshal(protocol.AgentHeartbeat{Data: "{}", Summary: protocol.AgentSummary{
		Name: "go_exec", Type: "native", State: "running", Version: "1.0.0", StartTime: time.Now().UTC()}})
	if err := a.nc.Publish(protocol.AgentHeartbeatSubject(n.ID(), "agent0"), b); err != nil {
		t.Fatal(err)
	}
	if silent := <-served; len(silent) != 0 {
		t.Fatalf("WaitServing after the first heartbeat = %v, want none", silent)
	}
	// Its registered name is no agent id: it counts for nothing (TestAttackNameClaimsReadyWait).
	if silent := n.WaitServing(short, []string{"go_exec"}); !slices.Equal(silent, []string{"go_exec"}) {
		t.Fatalf("WaitServing by the registered name = %v, want [go_exec]", silent)
	}
	if got := bids("after", 1); got != 1 {
		t.Fatalf("%d bids right after WaitServing returned, want 1", got)
	}

	// A nexlet that registers and hangs: no health from the registration, the usual
	// timeouts, no bid at any point; WaitServing gives up on it at its bound.
	registerSilent("agent1", "hung", "hung")
	short2, cancelShort2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancelShort2()
	if silent := n.WaitServing(short2, []string{"agent0", "agent1"}); !slices.Equal(silent, []string{"agent1"}) {
		t.Fatalf("WaitServing with a hung nexlet = %v, want [agent1]", silent)
	}
	hungBids := func(st string) {
		t.Helper()
		if got := len(f.auction("tenant", protocol.AuctionRequest{AuctionID: "hung-" + st, AgentType: "hung"}, 0)); got != 0 {
			t.Fatalf("the hung nexlet bid (%s)", st)
		}
	}
	for _, step := range []struct {
		silence time.Duration // how long it has been silent
		want    string
	}{
		{0, protocol.HealthUnknown},
		{(degradedAfter + offlineAfter) / 2, protocol.HealthDegraded},
		{offlineAfter + time.Minute, protocol.HealthOffline},
	} {
		if step.silence > 0 {
			silentFor("agent1", step.silence)
			// The node's sweep (every HealthTick) reports the change.
			testkit.Eventually(t, "the sweep's report of the hung nexlet "+step.want, func() bool {
				return events.last("agent1") == step.want
			})
		}
		if h := health("agent1"); h != step.want {
			t.Fatalf("the hung nexlet silent for %v: %s, want %s", step.silence, h, step.want)
		}
		hungBids(step.want)
	}
	want := []string{protocol.HealthUnknown + ">" + protocol.HealthDegraded, protocol.HealthDegraded + ">" + protocol.HealthOffline}
	if got := events.of("agent1"); !slices.Equal(got, want) {
		t.Fatalf("the hung nexlet's health changes %v, want %v", got, want)
	}
	if got := events.of("agent0"); !slices.Equal(got, []string{protocol.HealthUnknown + ">" + protocol.HealthHealthy}) {
		t.Fatalf("the served nexlet's health changes %v, want only unknown>healthy", got)
	}
}

// healthEvents records the nexlets' health changes a node emits, by agent id.
type healthEvents struct {
	mu      sync.Mutex
	changes map[string][]string // "from>to"
}

func (e *healthEvents) Emit(_, typ string, event any) {
	ev, ok := event.(protocol.AgentHealthChangedEvent)
	if typ != protocol.EventAgentHealthChanged || !ok {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.changes == nil {
		e.changes = map[string][]string{}
	}
	e.changes[ev.ID] = append(e.changes[ev.ID], ev.From+">"+ev.To)
}

func (e *healthEvents) of(id string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.changes[id])
}

// last is the health id changed to last ("" before any change).
func (e *healthEvents) last(id string) string {
	c := e.of(id)
	if len(c) == 0 {
		return ""
	}
	_, to, _ := strings.Cut(c[len(c)-1], ">")
	return to
}

// TestWaitServingWaitsForRegistration: a name not registered (its nexlet's process
// ended and a new one has not registered yet) is waited for until it registers and
// sends its first heartbeat.
func TestWaitServingWaitsForRegistration(t *testing.T) {
	f := newFixture(t, 1, nil)
	n := f.nodes[0]
	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if silent := n.WaitServing(short, []string{"agent0"}); !slices.Equal(silent, []string{"agent0"}) {
		t.Fatalf("WaitServing with nothing registered = %v, want [agent0]", silent)
	}
	ctx, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	served := make(chan []string, 1)
	go func() { served <- n.WaitServing(ctx, []string{"agent0"}) }()
	f.healthyAgent(n, "agent0", "go_exec", "native", nil) // registers, serves, heartbeats
	if silent := <-served; len(silent) != 0 {
		t.Fatalf("WaitServing = %v, want none", silent)
	}
}
