package node

import (
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestDrainCountsRemovalFailures: the end of lame duck mode stops every workload and
// removes each from node state; with the state store's JetStream disabled on the real
// nats-server the removals fail. The drain names each such workload (id, tombstone kept,
// why) in its result, its error and its log ("removal_failures" on "lame duck drain
// done"). Before, the failures were only logged one by one by the removal, and the
// drain reported no error: 0 of 3 counted; and an end report that came meanwhile
// logged "workload ended; removed from node state" ahead of its failed removal.
func TestDrainCountsRemovalFailures(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv), "DRAINNODE", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var logs testkit.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ts, err := NewTombstones(kv, t.TempDir(), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store, o.Logger = ts, log })
	n := f.nodes[0]
	f.healthyAgent(n, "AGENTNATIVE", "native", "native", nil)
	var ids []string
	for _, name := range []string{"a", "b", "c"} {
		ids = append(ids, f.deployIn(t, "default", name))
	}
	slices.Sort(ids)
	if err := srv.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	if _, err := n.EnterLameduck(0); err != nil {
		t.Fatal(err)
	}
	res, err := n.DrainWorkloads(t.Context())
	var failed []string
	for _, rf := range res.RemovalFailures {
		failed = append(failed, rf.WorkloadID)
		if !rf.Pending || rf.Err == nil {
			t.Errorf("removal failure %+v: want a tombstone kept (pending) and its cause", rf)
		}
	}
	if res.Workloads != 3 || !slices.Equal(failed, ids) {
		t.Fatalf("drain result: %d workloads, removal failures %v, want 3 and %v", res.Workloads, failed, ids)
	}
	for _, id := range ids {
		if err == nil || !strings.Contains(err.Error(), "drain workload "+id+": stopped, but removing it from node state failed: "+ErrRemovalPending.Error()) {
			t.Errorf("drain error %v does not name %s's failed removal", err, id)
		}
	}
	for _, want := range []string{`msg="lame duck drain done"`, `workloads=3 errors=3 removal_failures=3`,
		`msg="lame duck drain: stopped workloads not removed from node state"`,
		`count=3 workload_ids="[` + strings.Join(ids, " ") + `]" tombstoned=3`} {
		if !logs.Contains(want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
	// The nexlet's end reports, which came with the store down, did not remove them
	// either: before, each was logged "removed" ahead of its failed removal.
	if logs.Contains("workload ended; removed from node state") {
		t.Errorf("an end report logged a removal that failed:\n%s", logs.String())
	}
	if p := ts.Pending(); len(p) != 3 {
		t.Errorf("tombstones %v, want one per drained workload", p)
	}
}

// TestWorkloadEndedAckSaysWhenRemovalFailed: the owning nexlet reports two workloads
// ended; the first while the state store works (acknowledged removed), the second with
// the store's JetStream disabled on the real nats-server: acknowledged not removed,
// its removal pending (a tombstone kept). Before, both were acknowledged removed.
func TestWorkloadEndedAckSaysWhenRemovalFailed(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{})
	ts := kvTombstones(t, srv, "ENDEDNODE")
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = ts })
	n := f.nodes[0]
	a := f.healthyAgent(n, "AGENTNATIVE", "native", "native", nil)
	up, down := f.deployIn(t, "default", "up"), f.deployIn(t, "default", "down")
	ended := func(id string) protocol.WorkloadEndedAck {
		t.Helper()
		m := request(t, a.nc, protocol.WorkloadEndedSubject(n.ID(), a.id, id), protocol.WorkloadStoppedEvent{ID: id, Namespace: "default", WorkloadType: "native"})
		var ack protocol.WorkloadEndedAck
		if code := m.Header.Get(protocol.HeaderErrorCode); code != "" || protocol.Decode(m.Data, &ack) != nil {
			t.Fatalf("ended report for %s: %s %q", id, code, m.Data)
		}
		return ack
	}
	if ack := ended(up); !ack.Removed || ack.StateRemoval != "" {
		t.Errorf("ended with the store up: %+v, want removed", ack)
	}
	if err := srv.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	if ack := ended(down); ack.Removed || ack.StateRemoval != protocol.StateRemovalPending {
		t.Errorf("ended with the store down: %+v, want not removed, removal pending", ack)
	}
	// Not the first: the node's own WORKLOADSTOPPED of it (from the report) removes
	// nothing (TestOwnWorkloadStoppedRemovesOnce); before, it could come back after
	// JetStream was gone and tombstone it too.
	if p := ts.Pending(); !slices.Equal(p, []string{"native_" + down}) {
		t.Errorf("tombstones %v, want one for %s alone, whose removal failed", p, down)
	}
}

// kvTombstones is node state as nexd keeps it: a JetStream KV bucket of srv under
// Tombstones, closed at the test's end.
func kvTombstones(t *testing.T, srv *server.Server, bucket string) *Tombstones {
	t.Helper()
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv), bucket, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := NewTombstones(kv, t.TempDir(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	return ts
}
