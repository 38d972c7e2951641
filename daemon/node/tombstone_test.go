package node

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestTombstoneRetriedWhileRunning: a removal from a real KV bucket fails (JetStream
// disabled on the nats-server): Delete says it is pending and keeps a tombstone, and
// the bucket, once its server is back on the same store, is never read with the
// workload in it; the background retry removes the record and drops the tombstone
// without a restart of the store's user.
func TestTombstoneRetriedWhileRunning(t *testing.T) {
	var storeDir string
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { storeDir = o.StoreDir }})
	nc := testnats.Connect(t, s, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	kv, err := state.OpenKV(t.Context(), nc, "TOMBNODE", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := NewTombstones(kv, t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	for _, id := range []string{"W1", "W2"} {
		if err := ts.Put(t.Context(), "native", id, startReq("system", id, "")); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	if err := ts.Delete(t.Context(), "native", "W1"); !errors.Is(err, ErrRemovalPending) {
		t.Fatalf("delete with JetStream down: %v, want ErrRemovalPending", err)
	}
	if p := ts.Pending(); !slices.Equal(p, []string{"native_W1"}) {
		t.Fatalf("tombstones %v, want [native_W1]", p)
	}
	port := s.Addr().(*net.TCPAddr).Port
	s.Shutdown()
	s.WaitForShutdown()
	testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = storeDir, port }})
	testkit.EventuallyWithin(t, 30*time.Second, "the bucket readable again", func() bool {
		stored, err := ts.ByType(t.Context(), "native")
		if err != nil {
			return false
		}
		if _, ok := stored["W1"]; ok {
			t.Fatalf("the tombstoned workload is read from the bucket: %v", stored)
		}
		return true
	})
	testkit.EventuallyWithin(t, 30*time.Second, "the retried removal drops the tombstone", func() bool { return len(ts.Pending()) == 0 })
	stored, err := kv.ByType(t.Context(), "native")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stored["W1"]; ok || len(stored) != 1 {
		t.Errorf("bucket after the retry: %v, want W2 alone", stored)
	}
}

// TestTombstoneUnwritable: with the removal failing (JetStream disabled) and no
// tombstone possible either (its directory replaced by a file: a full file system, as
// the store's own), Delete says so: the error is not ErrRemovalPending, and it names
// both failures. The removal is still retried from memory while the node runs: once
// the store is back, the workload leaves the bucket (a next nexd does not replay it)
// and is not read from it meanwhile. Before, nothing retried it: it stayed in the
// bucket (1 of 1) until a next nexd replayed it.
func TestTombstoneUnwritable(t *testing.T) {
	var storeDir string
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { storeDir = o.StoreDir }})
	nc := testnats.Connect(t, s, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	kv, dir, ts := kvTombstonesIn(t, nc, "TOMBNODE")
	t.Cleanup(ts.Close)
	for _, id := range []string{"W1", "W2"} {
		if err := ts.Put(t.Context(), "native", id, startReq("system", id, "")); err != nil {
			t.Fatal(err)
		}
	}
	noRoomAnywhere(t, s, dir)
	err := ts.Delete(t.Context(), "native", "W1")
	if err == nil || errors.Is(err, ErrRemovalPending) || !strings.Contains(err.Error(), "no tombstone kept either") {
		t.Fatalf("delete with neither the store nor a tombstone: %v", err)
	}
	if p := ts.Pending(); !slices.Equal(p, []string{"native_W1"}) {
		t.Fatalf("pending removals %v, want [native_W1] (in memory)", p)
	}
	port := s.Addr().(*net.TCPAddr).Port
	s.Shutdown()
	s.WaitForShutdown()
	testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = storeDir, port }})
	testkit.EventuallyWithin(t, 30*time.Second, "the retried removal", func() bool {
		stored, err := ts.ByType(t.Context(), "native")
		if err == nil {
			if _, ok := stored["W1"]; ok {
				t.Fatalf("the stopped workload is read from the bucket: %v", stored)
			}
		}
		return err == nil && len(ts.Pending()) == 0
	})
	stored, err := kv.ByType(t.Context(), "native")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := stored["W1"]; ok || len(stored) != 1 {
		t.Errorf("bucket after the retry: %v, want W2 alone", stored)
	}
}

// slowReadStore is a MemStore whose removals fail while down, and whose ByType, once
// read, waits on hold (when set) before it returns what it read.
type slowReadStore struct {
	*MemStore
	down atomic.Bool
	hold chan chan struct{} // ByType sends a channel here and waits until it closes
}

func (s *slowReadStore) Delete(ctx context.Context, typ, id string) error {
	if s.down.Load() {
		return errors.New("store down")
	}
	return s.MemStore.Delete(ctx, typ, id)
}

func (s *slowReadStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	out, err := s.MemStore.ByType(ctx, typ)
	if s.hold != nil {
		wait := make(chan struct{})
		s.hold <- wait
		<-wait
	}
	return out, err
}

// TestTombstoneReadWhileRetried: a read of the store (a nexlet registering) that got
// the tombstoned workload from the store just before the background retry removed it
// and dropped its tombstone still leaves it out. Before, ByType filtered by the
// tombstones left after its read: none, and the stopped workload was replayed.
func TestTombstoneReadWhileRetried(t *testing.T) {
	st := &slowReadStore{MemStore: NewMemStore()}
	ts, err := NewTombstones(st, t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	ts.retry = 10 * time.Millisecond
	if err := ts.Put(t.Context(), "native", "W1", startReq("system", "W1", "")); err != nil {
		t.Fatal(err)
	}
	st.down.Store(true)
	if err := ts.Delete(t.Context(), "native", "W1"); !errors.Is(err, ErrRemovalPending) {
		t.Fatalf("delete with the store down: %v, want ErrRemovalPending", err)
	}
	st.hold = make(chan chan struct{})
	read := make(chan map[string]protocol.StartWorkloadRequest, 1)
	go func() {
		out, _ := ts.ByType(context.Background(), "native")
		read <- out
	}()
	wait := <-st.hold // the store was read with W1 in it
	st.down.Store(false)
	ts.wake()
	testkit.Eventually(t, "the retried removal drops the tombstone", func() bool { return len(ts.Pending()) == 0 })
	close(wait)
	if out := <-read; len(out) != 0 {
		t.Errorf("ByType read during the retry returned %v: the stopped workload would be replayed", out)
	}
}

// TestTombstonesListed: two workloads stopped (over NATS, in two namespaces) while the
// state store's JetStream is disabled on the real nats-server each leave a tombstone,
// and List names them: id, type, namespace and since when (what nexctl status, its
// --json and nexd_state_tombstones show); a tombstone an older nexd wrote (its time
// only) is listed with no namespace. Once the server is back on its store, the retried
// removals drop them and List is empty. Before, only the log said a tombstone was kept.
// The node's INFO over NATS lists them too (nexd_tombstones, nexd_tombstone_count:
// nexctl node info; before, only the node's own host showed them), and its answer still
// decodes as upstream's NodeInfoResponse: upstream's keys all there, every other key a
// nexd_ one; without tombstones the two keys are absent.
func TestTombstonesListed(t *testing.T) {
	var storeDir string
	srv := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { storeDir = o.StoreDir }})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond)), "LISTNODE", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ts, err := NewTombstones(kv, dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = ts })
	f.healthyAgent(f.nodes[0], "AGENTNATIVE", "native", "native", nil)
	ids := map[string]string{"tenant": f.deployIn(t, "tenant", "a"), "other": f.deployIn(t, "other", "b")}
	if l := ts.List(); len(l) != 0 {
		t.Fatalf("tombstones before any removal failed: %+v", l)
	}
	if err := srv.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	before := time.Now().Truncate(time.Second) // RFC 3339: whole seconds
	for ns, id := range ids {
		m := request(t, f.client, protocol.UndeploySubject(ns, id), protocol.StopWorkloadRequest{Namespace: ns})
		var resp protocol.StopWorkloadResponse
		if err := protocol.Decode(m.Data, &resp); err != nil || !resp.Stopped || resp.StateRemoval != protocol.StateRemovalPending {
			t.Fatalf("stop %s in %s: %q", id, ns, m.Data)
		}
	}
	testkit.WriteFile(t, filepath.Join(dir, "native_WOLDER"), before.UTC().Format(time.RFC3339)+"\n")
	got := map[string]Tombstone{}
	for _, tb := range ts.List() {
		got[tb.ID] = tb
	}
	if len(got) != 3 {
		t.Fatalf("tombstones %+v, want the two stopped workloads and the older one", got)
	}
	for ns, id := range ids {
		tb := got[id]
		if tb.Type != "native" || tb.Namespace != ns || tb.Since.Before(before) || tb.Since.After(time.Now()) {
			t.Errorf("tombstone of %s: %+v, want type native, namespace %s, since the stop", id, tb, ns)
		}
	}
	if tb := got["WOLDER"]; tb.Namespace != "" || tb.Since.Before(before) {
		t.Errorf("older tombstone %+v, want no namespace and its time", tb)
	}
	info := infoOverNATS(t, f)
	if info.TombstoneCount != 3 || len(info.Tombstones) != 3 {
		t.Fatalf("INFO tombstones %+v (count %d), want the 3 of List", info.Tombstones, info.TombstoneCount)
	}
	for _, tb := range info.Tombstones {
		if want := got[tb.ID]; !tb.Since.Equal(want.Since) || tb.Namespace != want.Namespace || tb.Type != want.Type {
			t.Errorf("INFO tombstone %+v, List has %+v", tb, want)
		}
	}

	port := srv.Addr().(*net.TCPAddr).Port
	srv.Shutdown()
	srv.WaitForShutdown()
	testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = storeDir, port }})
	testkit.EventuallyWithin(t, 60*time.Second, "the retried removals drop the tombstones", func() bool { return len(ts.List()) == 0 })
	// The test's client can be reconnected before the node has resubscribed:
	// until then INFO has no responders.
	testkit.EventuallyWithin(t, 60*time.Second, "the node answers INFO again", func() bool {
		_, err := f.client.Request(protocol.InfoSubject(f.nodes[0].ID()), []byte("{}"), 2*time.Second)
		return err == nil
	})
	if info := infoOverNATS(t, f); info.TombstoneCount != 0 || info.Tombstones != nil {
		t.Fatalf("INFO after the removals: tombstones %+v (count %d)", info.Tombstones, info.TombstoneCount)
	}
}

// infoOverNATS asks f's node for INFO and checks the answer is upstream's
// NodeInfoResponse plus nexd_ keys only.
func infoOverNATS(t *testing.T, f *fixture) protocol.NodeInfoResponse {
	t.Helper()
	m := request(t, f.client, protocol.InfoSubject(f.nodes[0].ID()), struct{}{})
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(m.Data, &obj); err != nil {
		t.Fatalf("INFO %q: %v", m.Data, err)
	}
	upstream := []string{"node_agent_summaries", "node_id", "tags", "uptime", "version", "xkey"}
	for k := range obj {
		if !slices.Contains(upstream, k) && !strings.HasPrefix(k, "nexd_") {
			t.Errorf("INFO key %q is neither upstream's nor a nexd_ extension", k)
		}
	}
	// Upstream's decoder: its required keys, then the fields it knows.
	var up struct {
		NodeID  string            `json:"node_id"`
		Tags    map[string]string `json:"tags"`
		Uptime  string            `json:"uptime"`
		Version string            `json:"version"`
		XKey    string            `json:"xkey"`
	}
	for _, k := range upstream[1:] {
		if _, ok := obj[k]; !ok {
			t.Errorf("INFO lacks upstream's required key %q", k)
		}
	}
	if err := json.Unmarshal(m.Data, &up); err != nil || up.NodeID != f.nodes[0].ID() {
		t.Fatalf("INFO as upstream's NodeInfoResponse: %+v, %v", up, err)
	}
	var info protocol.NodeInfoResponse
	if err := protocol.Decode(m.Data, &info); err != nil {
		t.Fatal(err)
	}
	return info
}

// TestTombstoneInMemoryWrittenAtClose: a removal kept in memory (no room for its
// tombstone) is written as a tombstone when nexd stops, if there is room by then: the
// operator frees space and restarts nexd before the bucket takes the removal. Before,
// it was dropped with the process and the next nexd replayed the stopped workload.
func TestTombstoneInMemoryWrittenAtClose(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	kv, dir, ts := kvTombstonesIn(t, nc, "TOMBCLOSE")
	if err := ts.Put(t.Context(), "native", "W1", startReq("system", "W1", "")); err != nil {
		t.Fatal(err)
	}
	noRoomAnywhere(t, s, dir)
	if err := ts.Delete(t.Context(), "native", "W1"); err == nil || errors.Is(err, ErrRemovalPending) {
		t.Fatalf("delete with neither the store nor a tombstone: %v", err)
	}
	if err := os.Remove(dir); err != nil { // room again
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ts.Close()
	next, err := NewTombstones(kv, dir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if p := next.Pending(); !slices.Equal(p, []string{"native_W1"}) {
		t.Errorf("pending removals after a restart with room again: %v, want [native_W1]", p)
	}
}

// kvTombstonesIn opens bucket on nc and tombstones over it in a new directory.
func kvTombstonesIn(t *testing.T, nc *nats.Conn, bucket string) (*state.KV, string, *Tombstones) {
	t.Helper()
	kv, err := state.OpenKV(t.Context(), nc, bucket, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "tombstones")
	ts, err := NewTombstones(kv, dir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return kv, dir, ts
}

// noRoomAnywhere makes the tombstones' directory a file and takes s's JetStream away:
// neither a removal nor a tombstone can be written.
func noRoomAnywhere(t *testing.T, s *server.Server, dir string) {
	t.Helper()
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	testkit.WriteFile(t, dir, "not a directory")
	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
}

// TestTombstoneWriteLeftoverRemoved: the temporary file of a tombstone write cut short
// (".<key>": nexd killed before its rename) is removed when the next nexd opens the
// tombstones; a tombstone beside it stays and is retried. Before, the leftover stayed
// in the directory for good.
func TestTombstoneWriteLeftoverRemoved(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, s), "TOMBLEFT", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	testkit.WriteFile(t, filepath.Join(dir, ".native_W1"), "2026-01-01T00:00:00Z\nsystem\n")
	testkit.WriteFile(t, filepath.Join(dir, "native_W2"), "2026-01-01T00:00:00Z\nsystem\n")
	if err := kv.Put(t.Context(), "native", "W2", startReq("system", "W2", "")); err != nil {
		t.Fatal(err)
	}
	ts, err := NewTombstones(kv, dir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	if _, err := os.Stat(filepath.Join(dir, ".native_W1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the unfinished write is still there: %v", err)
	}
	testkit.Eventually(t, "the tombstone beside it retried and dropped", func() bool {
		ents, err := os.ReadDir(dir)
		return err == nil && len(ents) == 0
	})
}

// TestTombstoneKeepsNamespaceOnSecondRemoval: a workload stopped while the store is
// down gets a tombstone naming its namespace; its end, reported after the stop, removes
// it again without knowing the namespace (the node no longer holds it). That second
// write left the tombstone without one (TestTombstonesListed failed so in a CI run,
// "Namespace:" empty for the second workload); the first one's namespace stays now.
func TestTombstoneKeepsNamespaceOnSecondRemoval(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, srv, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond)), "KEEPNS", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := NewTombstones(kv, t.TempDir(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	if err := srv.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	if err := ts.Delete(withNamespace(t.Context(), "other"), "native", "W1"); !errors.Is(err, ErrRemovalPending) {
		t.Fatalf("first removal: %v, want %v", err, ErrRemovalPending)
	}
	if err := ts.Delete(t.Context(), "native", "W1"); !errors.Is(err, ErrRemovalPending) {
		t.Fatalf("second removal: %v, want %v", err, ErrRemovalPending)
	}
	l := ts.List()
	if len(l) != 1 || l[0].Namespace != "other" {
		t.Fatalf("tombstones %+v, want W1's in namespace other", l)
	}
}
