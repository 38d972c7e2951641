package node

import (
	"context"
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
// tombstone possible either (its directory replaced by a file), Delete says so: the
// error is not ErrRemovalPending, and it names both failures.
func TestTombstoneUnwritable(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, s), "TOMBNODE", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "tombstones")
	ts, err := NewTombstones(kv, dir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ts.Close)
	if err := ts.Put(t.Context(), "native", "W1", startReq("system", "W1", "")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	testkit.WriteFile(t, dir, "not a directory")
	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	err = ts.Delete(t.Context(), "native", "W1")
	if err == nil || errors.Is(err, ErrRemovalPending) || !strings.Contains(err.Error(), "no tombstone kept either") {
		t.Fatalf("delete with neither the store nor a tombstone: %v", err)
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
