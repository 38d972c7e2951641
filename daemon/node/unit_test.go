package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

func TestMemStore(t *testing.T) {
	ctx := context.Background()
	s := NewMemStore()
	req := startReq("ns", "w", `{"cmd":"x"}`)
	for _, k := range []struct{ typ, id string }{{"native", "a"}, {"native", "b"}, {"nativeX", "c"}} {
		if err := s.Put(ctx, k.typ, k.id, req); err != nil {
			t.Fatal(err)
		}
	}
	got, _ := s.ByType(ctx, "native")
	if len(got) != 2 {
		t.Errorf("ByType(native) = %v: must be an exact match, not a prefix", got)
	}
	_ = s.Delete(ctx, "native", "a")
	_ = s.Delete(ctx, "native", "missing")
	if got, _ := s.ByType(ctx, "native"); len(got) != 1 || s.Len() != 2 {
		t.Errorf("after delete: %v, len %d", got, s.Len())
	}
	big := startReq("ns", "w", strings.Repeat("x", DefaultMaxValueBytes))
	if err := s.Put(ctx, "native", "big", big); !errors.Is(err, state.ErrValueTooLarge) {
		t.Errorf("oversize put: %v", err)
	}
	if err := (&MemStore{MaxValueBytes: -1}).Put(ctx, "native", "big", big); err != nil {
		t.Errorf("unlimited store: %v", err)
	}
	if err := s.Put(ctx, "", "x", req); err == nil {
		t.Error("empty type accepted")
	}
	if m, err := (NoStore{}).ByType(ctx, "native"); err != nil || m == nil || len(m) != 0 {
		t.Errorf("NoStore.ByType = %v, %v", m, err)
	}
}

func TestHealth(t *testing.T) {
	n := &Node{o: Options{DegradedAfter: 10 * time.Second, OfflineAfter: 30 * time.Second}}
	now := time.Now()
	tests := []struct {
		state    string
		age      time.Duration
		beat     bool
		expected string
	}{
		{"running", time.Second, true, protocol.HealthHealthy},
		{"error", time.Second, true, protocol.HealthDegraded},
		{"starting", time.Second, true, protocol.HealthDegraded},
		{"lameduck", time.Second, true, protocol.HealthShuttingDown},
		{"stopping", time.Second, true, protocol.HealthShuttingDown},
		{"weird", time.Second, true, protocol.HealthUnknown},
		{"", time.Second, false, protocol.HealthUnknown},
		{"running", 11 * time.Second, true, protocol.HealthDegraded},
		{"running", 31 * time.Second, true, protocol.HealthOffline},
		{"", 31 * time.Second, false, protocol.HealthOffline},
	}
	for _, tc := range tests {
		r := &registration{lastSeen: now.Add(-tc.age), summary: protocol.AgentSummary{State: tc.state}}
		if tc.beat {
			r.lastBeat = r.lastSeen
		}
		if got := n.health(r, now); got != tc.expected {
			t.Errorf("state %q age %s beat %v: %s, want %s", tc.state, tc.age, tc.beat, got, tc.expected)
		}
	}
}

func TestNewValidates(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	server, _ := nkeys.CreateServer()
	user, _ := nkeys.CreateUser()
	curve, _ := nkeys.CreateCurveKeys()
	m := testMinter{url: srv.ClientURL()}
	tests := []struct {
		name string
		o    Options
	}{
		{"no conn", Options{NodeKey: server, XKey: curve, Minter: m}},
		{"no minter", Options{NC: nc, NodeKey: server, XKey: curve}},
		{"user key as node key", Options{NC: nc, NodeKey: user, XKey: curve, Minter: m}},
		{"server key as xkey", Options{NC: nc, NodeKey: server, XKey: server, Minter: m}},
		{"reserved tag", Options{NC: nc, NodeKey: server, XKey: curve, Minter: m, Tags: map[string]string{"nex.os": "x"}}},
		{"nexus with a dot", Options{NC: nc, NodeKey: server, XKey: curve, Minter: m, Nexus: "a.b"}},
	}
	for _, tc := range tests {
		// Each names what is wrong; a key of the wrong kind ended in ": <nil>" before.
		if _, err := New(tc.o); err == nil || strings.Contains(err.Error(), "<nil>") {
			t.Errorf("%s: %v, want a refusal", tc.name, err)
		}
	}
	// A non-semver version still starts (micro insists on semver).
	n, err := New(Options{NC: nc, NodeKey: server, XKey: curve, Minter: m, Version: "dev"})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n.Ping().Version != "dev" {
		t.Errorf("version = %q", n.Ping().Version)
	}
	if err := n.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestHeartbeatAndNodeEvents(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	watch := testnats.Connect(t, srv)
	events, _ := watch.SubscribeSync("$NEX.FEED.*.events.>")
	beats, _ := watch.SubscribeSync(protocol.NodeHeartbeatSubject("*"))
	_ = watch.Flush()

	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Emitter = NATSEmitter{NC: o.NC} })
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	testkit.Eventually(t, "a heartbeat listing the nexlet", func() bool {
		m, err := beats.NextMsg(5 * time.Second)
		if err != nil {
			return false
		}
		var hb protocol.NodeHeartbeat
		_ = json.Unmarshal(m.Data, &hb)
		return m.Subject == protocol.NodeHeartbeatSubject(n.ID()) && hb.Registrations == "agent0 [native]" && hb.State == protocol.NodeRunning
	})
	if _, err := n.EnterLameduck(time.Minute); err != nil {
		t.Fatal(err)
	}
	want := []string{protocol.EventNodeStarted, protocol.EventAgentStarted, protocol.EventAgentHealthChanged, protocol.EventNodeLameduckSet, protocol.EventAgentLameduckSet, protocol.EventNodeStopped}
	got := map[string]json.RawMessage{}
	for len(got) < len(want) {
		if _, ok := got[protocol.EventAgentLameduckSet]; ok && len(got) == len(want)-1 {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := n.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			cancel()
		}
		m, err := events.NextMsg(10 * time.Second)
		if err != nil {
			t.Fatalf("events so far %v: %v", got, err)
		}
		if protocol.Token(m.Subject, 2) != n.ID() {
			t.Errorf("event %s not keyed by node id", m.Subject)
		}
		got[protocol.LastToken(m.Subject)] = m.Data
	}
	var health protocol.AgentHealthChangedEvent
	if err := json.Unmarshal(got[protocol.EventAgentHealthChanged], &health); err != nil || health.To != "healthy" || health.Name == "" {
		t.Errorf("AGENTHEALTHCHANGED %s", got[protocol.EventAgentHealthChanged])
	}
	var started protocol.NodeStartedEvent
	if err := json.Unmarshal(got[protocol.EventNodeStarted], &started); err != nil || started.Type != protocol.NodeStartedEventType || started.Nexus != "testnexus" {
		t.Errorf("NODESTARTED %s", got[protocol.EventNodeStarted])
	}
	for _, w := range want {
		if _, ok := got[w]; !ok {
			t.Errorf("no %s event", w)
		}
	}
}

func TestLogEmitter(t *testing.T) {
	var buf bytes.Buffer
	LogEmitter{Logger: slog.New(slog.NewJSONHandler(&buf, nil))}.Emit("N1", protocol.EventNodeStopped, protocol.NodeStoppedEvent{ID: "N1"})
	if !strings.Contains(buf.String(), `"type":"NODESTOPPED"`) || !strings.Contains(buf.String(), "event emitted") {
		t.Errorf("log = %s", buf.String())
	}
	NoEmitter{}.Emit("x", "y", nil)
}

func TestHeaderSafe(t *testing.T) {
	if got := headerSafe("a\nb\r\n  c"); got != "a b c" {
		t.Errorf("got %q", got)
	}
	if got := headerSafe(strings.Repeat("x", 2000)); len(got) != 512 {
		t.Errorf("len %d", len(got))
	}
}
