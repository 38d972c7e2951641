package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func request(name, ns, typ, run string) protocol.StartWorkloadRequest {
	return protocol.StartWorkloadRequest{
		Name: name, Namespace: ns, Description: "test", WorkloadType: typ,
		WorkloadLifecycle: "service", RunRequest: run, Tags: map[string]string{"a": "b"},
	}
}

func open(t *testing.T, nc *nats.Conn, node, domain string) *KV {
	t.Helper()
	kv, err := OpenKV(testCtx(t), nc, node, domain, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kv.Close)
	return kv
}

func TestPutGetDelete(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "NODE1", "")
	if kv.Bucket() != "nex-NODE1" || kv.MaxValueSize() != MaxValueSize {
		t.Fatalf("bucket %s, limit %d", kv.Bucket(), kv.MaxValueSize())
	}

	want := map[string]protocol.StartWorkloadRequest{}
	for i := range 50 {
		id := nuid.Next()
		req := request(fmt.Sprintf("w%d", i), "ns1", "native", `{"uri":"file:///bin/true","encrypted_environment":{"base64_encrypted_env":"c2VhbGVk","encrypted_by":"XKEY"}}`)
		if err := kv.Put(ctx, "native", id, req); err != nil {
			t.Fatal(err)
		}
		want[id] = req
	}
	got, err := kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 50 {
		t.Fatalf("got %d workloads, want 50", len(got))
	}
	for id, req := range want {
		g, ok := got[id]
		if !ok || g.Name != req.Name || g.RunRequest != req.RunRequest || g.Tags["a"] != "b" {
			t.Fatalf("workload %s: got %+v, want %+v", id, g, req)
		}
	}

	// The stored value is exactly the request: no credentials, nothing added.
	raw, err := kv.kv.Get(ctx, "native."+firstKey(want))
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(raw.Value(), &fields); err != nil {
		t.Fatal(err)
	}
	for k := range fields {
		if strings.Contains(k, "cred") || strings.Contains(k, "jwt") || strings.Contains(k, "seed") {
			t.Fatalf("stored value has field %q", k)
		}
	}

	id := firstKey(want)
	for range 2 { // idempotent
		if err := kv.Delete(ctx, "native", id); err != nil {
			t.Fatal(err)
		}
	}
	if err := kv.Delete(ctx, "native", "NEVERSTORED"); err != nil {
		t.Fatalf("delete of an unknown workload: %v", err)
	}
	got, err = kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := got[id]; ok || len(got) != 49 {
		t.Fatalf("after delete: %d workloads, deleted one present %v", len(got), ok)
	}
	// Overwrite keeps one entry.
	if err := kv.Put(ctx, "native", firstKey(got), request("renamed", "ns1", "native", "{}")); err != nil {
		t.Fatal(err)
	}
	all, err := kv.All(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 49 || all["native_"+firstKey(got)].Name != "renamed" {
		t.Fatalf("all: %d entries", len(all))
	}
}

func firstKey[V any](m map[string]V) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys[0]
}

func TestByTypeExactPrefix(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "NODE1", "")
	puts := []struct{ typ, id string }{
		{"native", "A1"}, {"nativeX", "B1"}, {"native_x", "C1"}, {"nat", "D1"}, {"native", "A2"},
	}
	for _, p := range puts {
		if err := kv.Put(ctx, p.typ, p.id, request(p.id, "ns", p.typ, "{}")); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		typ  string
		want []string
	}{
		{"native", []string{"A1", "A2"}},
		{"nativeX", []string{"B1"}},
		{"native_x", []string{"C1"}},
		{"nat", []string{"D1"}},
		{"wasm", nil},
	}
	for _, tt := range tests {
		t.Run(tt.typ, func(t *testing.T) {
			got, err := kv.ByType(ctx, tt.typ)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for id := range got {
				ids = append(ids, id)
			}
			slices.Sort(ids)
			if !slices.Equal(ids, tt.want) {
				t.Fatalf("ByType(%q) = %v, want %v", tt.typ, ids, tt.want)
			}
		})
	}
}

func TestRefusesOversizeAndBadKeys(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "NODE1", "")

	base, _ := json.Marshal(request("w", "ns", "native", ""))
	exact := request("w", "ns", "native", strings.Repeat("x", MaxValueSize-len(base)))
	if err := kv.Put(ctx, "native", "EXACT", exact); err != nil {
		t.Fatalf("a request of exactly the limit: %v", err)
	}
	over := request("w", "ns", "native", strings.Repeat("x", MaxValueSize-len(base)+1))
	err := kv.Put(ctx, "native", "OVER", over)
	want := fmt.Sprintf("start request of %d bytes exceeds the state store's limit of %d bytes", MaxValueSize+1, MaxValueSize)
	if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrValueTooLarge) {
		t.Fatalf("oversize put: %v, want %q", err, want)
	}
	var tooLarge *ValueTooLargeError
	if !errors.As(err, &tooLarge) || tooLarge.Limit != MaxValueSize {
		t.Fatalf("oversize put: %#v", err)
	}
	if _, err := kv.kv.Get(ctx, "native.OVER"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("oversize request was written: %v", err)
	}

	for _, tc := range []struct{ typ, id, want string }{
		{"", "A", "workload type"}, {"na.tive", "A", "workload type"}, {"native", "a_b", "workload id"},
		{"native", "", "workload id"}, {"native", "a.>", "workload id"},
	} {
		if err := kv.Put(ctx, tc.typ, tc.id, request("w", "ns", "native", "{}")); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("Put(%q, %q): %v", tc.typ, tc.id, err)
		}
	}
	if _, err := OpenKV(ctx, nc, "bad.node", "", nil); err == nil {
		t.Fatal("opened a bucket for node id bad.node")
	}
}

func TestExistingBucketLimitIsEnforced(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	js, _ := jetstream.New(nc)
	// As upstream creates it.
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "nex-OLD", MaxBytes: 100_000_000, MaxValueSize: 10_000}); err != nil {
		t.Fatal(err)
	}
	kv := open(t, nc, "OLD", "")
	if kv.MaxValueSize() != 10_000 {
		t.Fatalf("limit %d", kv.MaxValueSize())
	}
	err := kv.Put(ctx, "native", "A", request("w", "ns", "native", strings.Repeat("x", 20_000)))
	if err == nil || !strings.Contains(err.Error(), "limit of 10000 bytes") {
		t.Fatalf("put: %v", err)
	}
}

func TestUnreadableValueIsSkipped(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "NODE1", "")
	if err := kv.Put(ctx, "native", "GOOD", request("w", "ns", "native", "{}")); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.kv.Put(ctx, "native.BAD", []byte("not json")); err != nil {
		t.Fatal(err)
	}
	got, err := kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got["GOOD"].Name != "w" {
		t.Fatalf("got %v", got)
	}
}

func serverKey(t *testing.T) string {
	t.Helper()
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	return pub
}

func TestJetStreamDomain(t *testing.T) {
	s := testnats.Start(t, testnats.Options{Domain: "hub"})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	node := serverKey(t)
	kv := open(t, nc, node, "hub")
	if err := kv.Put(ctx, "native", "A1", request("w", "ns", "native", "{}")); err != nil {
		t.Fatal(err)
	}
	// The bucket is reachable through the domain's API prefix.
	hub, err := jetstream.NewWithDomain(nc, "hub")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := hub.KeyValue(ctx, BucketName(node))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Get(ctx, "native.A1"); err != nil {
		t.Fatal(err)
	}
	ids, err := ListNodeBuckets(ctx, nc, "hub")
	if err != nil || !slices.Equal(ids, []string{node}) {
		t.Fatalf("buckets in hub: %v %v", ids, err)
	}
	// A domain nobody serves fails with a message naming it.
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := OpenKV(short, nc, node, "elsewhere", nil); err == nil || !strings.Contains(err.Error(), `"elsewhere"`) {
		t.Fatalf("open in an unserved domain: %v", err)
	}
}

func TestSurvivesServerRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := testnats.Options{Configure: func(o *server.Options) { o.StoreDir = dir }}
	ctx := testCtx(t)

	node := serverKey(t)
	s1 := testnats.Start(t, cfg)
	nc1, err := nats.Connect(s1.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	kv := open(t, nc1, node, "")
	for i := range 10 {
		if err := kv.Put(ctx, "native", fmt.Sprintf("W%d", i), request(fmt.Sprintf("w%d", i), "ns", "native", "{}")); err != nil {
			t.Fatal(err)
		}
	}
	if err := kv.Delete(ctx, "native", "W3"); err != nil {
		t.Fatal(err)
	}
	nc1.Close()
	s1.Shutdown()
	s1.WaitForShutdown()

	s2 := testnats.Start(t, cfg)
	nc2 := testnats.Connect(t, s2)
	kv2 := open(t, nc2, node, "")
	got, err := kv2.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 9 {
		t.Fatalf("after restart: %d workloads, want 9", len(got))
	}
	if _, ok := got["W3"]; ok {
		t.Fatal("deleted workload came back")
	}
	if got["W7"].Name != "w7" {
		t.Fatalf("W7: %+v", got["W7"])
	}
	ids, err := ListNodeBuckets(ctx, nc2, "")
	if err != nil || !slices.Equal(ids, []string{node}) {
		t.Fatalf("restart created buckets: %v %v", ids, err)
	}
	// nexctl's read-only view: the same data, and no bucket made for an unknown node.
	ro, err := OpenExistingKV(ctx, nc2, node, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if all, err := ro.All(ctx); err != nil || len(all) != 9 || all["native_W7"].Name != "w7" {
		t.Fatalf("read-only view: %d entries, %v", len(all), err)
	}
	if _, err := OpenExistingKV(ctx, nc2, serverKey(t), "", nil); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Fatalf("open of a missing bucket: %v", err)
	}
	if ids, _ := ListNodeBuckets(ctx, nc2, ""); len(ids) != 1 {
		t.Fatalf("read-only open created a bucket: %v", ids)
	}
}

func TestPruneBuckets(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	aliveID, dead1, dead2 := serverKey(t), serverKey(t), serverKey(t)
	for _, n := range []string{aliveID, dead1, dead2} {
		kv := open(t, nc, n, "")
		if err := kv.Put(ctx, "native", "W1", request("w", "ns", "native", "{}")); err != nil {
			t.Fatal(err)
		}
	}
	js, _ := jetstream.New(nc)
	for _, b := range []string{"unrelated", "nex-artifacts"} {
		if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: b}); err != nil {
			t.Fatal(err)
		}
	}
	// Only aliveID answers pings, as a running node does.
	sub, err := nc.Subscribe(protocol.PingNodeSubject(aliveID), func(m *nats.Msg) {
		_ = m.Respond([]byte(`{"node_id":"` + aliveID + `"}`))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	alive := func(id string) bool {
		_, err := nc.Request(protocol.PingNodeSubject(id), []byte(`{"filter":null}`), 5*time.Second)
		return err == nil
	}

	removed, err := PruneBuckets(ctx, nc, "", alive)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{dead1, dead2}
	slices.Sort(removed)
	slices.Sort(want)
	if !slices.Equal(removed, want) {
		t.Fatalf("removed %v, want %v", removed, want)
	}
	ids, err := ListNodeBuckets(ctx, nc, "")
	if err != nil || !slices.Equal(ids, []string{aliveID}) {
		t.Fatalf("left %v %v", ids, err)
	}
	for _, b := range []string{"unrelated", "nex-artifacts"} {
		if _, err := js.KeyValue(ctx, b); err != nil {
			t.Fatalf("pruned %s, which is not node state: %v", b, err)
		}
	}
	kv := open(t, nc, aliveID, "")
	if got, _ := kv.ByType(ctx, "native"); len(got) != 1 {
		t.Fatalf("live node lost its state: %v", got)
	}
}

// A single server gets one replica from auto; an explicit count the server cannot
// give is an error naming the count, never a quietly smaller bucket; a bucket made
// with fewer replicas than now configured is not silently kept (the single server
// cannot scale it up, so opening fails and says so).
func TestReplicas(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	if n, why := AutoReplicas(nc); n != 1 || !strings.Contains(why, "not clustered") {
		t.Fatalf("AutoReplicas = %d (%s), want 1 for a lone server", n, why)
	}
	kv, err := OpenReplicatedKV(ctx, nc, "NODEAUTO", "", 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if kv.Replicas() != 1 {
		t.Fatalf("auto on a lone server: %d replicas", kv.Replicas())
	}
	_, err = OpenReplicatedKV(ctx, nc, "NODETHREE", "", 3, nil)
	if err == nil || !strings.Contains(err.Error(), "3 replicas") {
		t.Fatalf("3 replicas on a lone server: %v", err)
	}
	_, err = OpenReplicatedKV(ctx, nc, "NODEAUTO", "", 3, nil)
	if err == nil || !strings.Contains(err.Error(), "has 1 replicas") {
		t.Fatalf("scaling an R1 bucket to 3 on a lone server: %v", err)
	}
}

// TestHealth: a bucket on a working server is healthy with its one replica; once the
// server's JetStream is gone, Health says JetStream did not answer.
func TestHealth(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	kv := open(t, nc, "NHEALTH", "")
	h := kv.Health(testCtx(t))
	if h.Err != nil || h.Replicas != 1 || h.Current != 1 {
		t.Fatalf("healthy bucket: %+v", h)
	}
	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if h := kv.Health(ctx); h.Err == nil {
		t.Fatalf("JetStream disabled, yet the bucket is healthy: %+v", h)
	}
}

// TestWriteFailureOnFullStore: on a real full store (the server's store directory a
// filled tmpfs) the bucket's stream info still answers, so Health's stream check says
// nothing; the failed write is kept (WriteFailure) and a probe write confirms it
// (Health's WriteErr), until the server restarts on a store with room: a probe write
// then clears it. The probe is never read back as a workload.
func TestWriteFailureOnFullStore(t *testing.T) {
	store := testkit.SmallFS(t, "160m") // JetStream reserves the bucket's 100 MB from 75 % of the free space
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir = store }})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "FULL", "")
	put := func(i int) error {
		cx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return kv.Put(cx, "native", fmt.Sprintf("w%d", i), request("w", "ns1", "native", `{"uri":"file:///bin/true"}`))
	}
	if err := put(0); err != nil {
		t.Fatal(err)
	}
	if err := kv.ProbeWrite(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.WriteFailure(); err != nil {
		t.Fatalf("a write failure before the store filled: %v", err)
	}
	fill := testkit.FillFS(t, store)
	t0 := time.Now()
	failed := 0
	for i := 1; i < 40 && failed == 0; i++ {
		if put(i) != nil { // the first may still fit in a written page
			failed = i
		}
	}
	if failed == 0 {
		t.Fatal("writes on a full store did not fail")
	}
	t.Logf("write %d failed after %v", failed, time.Since(t0))
	since, err := kv.WriteFailure()
	if err == nil || since.IsZero() {
		t.Fatalf("the failed write %d is not kept: %v, since %v", failed, err, since)
	}
	hctx, cancel := context.WithTimeout(ctx, 3*time.Second) // a write to a full store may time out rather than fail
	h := kv.Health(hctx)
	cancel()
	if h.Err != nil {
		t.Fatalf("stream info on a full store: %v (expected to answer; the write probe is what tells)", h.Err)
	}
	if h.WriteErr == nil || !h.WriteSince.Equal(since) {
		t.Fatalf("health on a full store: %+v, want the write failure since %v", h, since)
	}
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	port := s.Addr().(*net.TCPAddr).Port
	s.Shutdown()
	s.WaitForShutdown()
	testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = store, port }})
	testkit.EventuallyWithin(t, 30*time.Second, "a probe write takes once the server restarted with room", func() bool {
		cx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		h := kv.Health(cx)
		return h.Err == nil && h.WriteErr == nil
	})
	if _, err := kv.WriteFailure(); err != nil {
		t.Fatalf("a write failure kept after a probe took: %v", err)
	}
	all, err := kv.All(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for k := range all {
		if _, _, ok := SplitKey(k); !ok || strings.Contains(k, "probe") {
			t.Errorf("the bucket reads back %q, not a workload", k)
		}
	}
	if len(all) != failed {
		t.Errorf("%d workloads read back, want the %d written before the failure", len(all), failed)
	}
}

// TestWriteOutcomesInOrderBegun: WriteFailure follows the writes in the order they
// began, not the order they ended. A slow write that fails after a later write took (a
// write probe timing out across the server's restart, after removals had succeeded:
// e2e TestExternalStoreDiskFull's node then refused a deploy on a store that took
// writes) says nothing new; nor does a slow write that succeeds after a later one
// failed. Before, the last write to end decided.
func TestWriteOutcomesInOrderBegun(t *testing.T) {
	s := &KV{failing: make(chan struct{}, 1)}
	full := errors.New("insufficient storage")

	slow, later := s.beginWrite(), s.beginWrite()
	s.noteWrite(later, nil)
	s.noteWrite(slow, context.DeadlineExceeded)
	if _, err := s.WriteFailure(); err != nil {
		t.Fatalf("a failure of a write begun before one that took: %v", err)
	}

	slow, later = s.beginWrite(), s.beginWrite()
	s.noteWrite(later, full)
	s.noteWrite(slow, nil)
	since, err := s.WriteFailure()
	if !errors.Is(err, full) || since.IsZero() {
		t.Fatalf("after a later write failed, an earlier one's success cleared it: %v, since %v", err, since)
	}
	select {
	case <-s.WriteFailing():
	default:
		t.Error("no WriteFailing token when writes began to fail")
	}

	s.noteWrite(s.beginWrite(), nil)
	if _, err := s.WriteFailure(); err != nil {
		t.Fatalf("a write begun after the failure took, and the failure is kept: %v", err)
	}
}

// TestNotWritten: NotWritten tells a Put that certainly stored nothing (refused before
// the send, answered by JetStream with an error, no stream listening) from one whose
// answer was lost (an expired deadline: the server may have taken it), on a real
// server. A deploy refused after the latter removes the record (node's rollback).
func TestNotWritten(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "NOTWRITTEN", "")
	base, _ := json.Marshal(request("w", "ns", "native", ""))
	over := request("w", "ns", "native", strings.Repeat("x", MaxValueSize-len(base)+1))
	if err := kv.Put(ctx, "native", "OVER", over); err == nil || !NotWritten(err) {
		t.Errorf("oversize put: %v, NotWritten false", err)
	}
	if err := kv.Put(ctx, "na.tive", "A", request("w", "ns", "native", "{}")); err == nil || !NotWritten(err) {
		t.Errorf("bad key put: %v, NotWritten false", err)
	}
	expired, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	if err := kv.Put(expired, "native", "LATE", request("w", "ns", "native", "{}")); err == nil || NotWritten(err) {
		t.Errorf("put with an expired deadline: %v, NotWritten true: its answer is lost, not the write refused", err)
	}
	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	cx, cancel2 := context.WithTimeout(ctx, 5*time.Second)
	defer cancel2()
	if err := kv.Put(cx, "native", "NOJS", request("w", "ns", "native", "{}")); err == nil || !NotWritten(err) {
		t.Errorf("put with JetStream disabled: %v, NotWritten false", err)
	}
}

// TestMarkStartedNeverBringsBackARemovedRecord: a job's start mark is written off the
// deploy's path while its end may remove the record: a mark of a record still there
// sets nexd_started, of one removed before stores nothing, and a mark racing a removal
// (300 rounds, each a removal and a mark at once on a real JetStream bucket) never
// brings the record back. A plain Put there would (the mark read the record before the
// removal and wrote after it).
func TestMarkStartedNeverBringsBackARemovedRecord(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	kv := open(t, nc, "NODE1", "")
	req := request("job", "ns1", "native", `{}`)
	req.WorkloadLifecycle, req.Owner, req.Memory = protocol.LifecycleJob, "local:native", "m1"
	marked := req
	marked.Started = true

	if err := kv.Put(ctx, "native", "kept", req); err != nil {
		t.Fatal(err)
	}
	if err := kv.MarkStarted(ctx, "native", "kept", marked); err != nil {
		t.Fatal(err)
	}
	if err := kv.Put(ctx, "native", "gone", req); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "native", "gone"); err != nil {
		t.Fatal(err)
	}
	if err := kv.MarkStarted(ctx, "native", "gone", marked); err != nil {
		t.Fatalf("mark of a removed record: %v", err)
	}
	got, err := kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if !got["kept"].Started || got["kept"].Memory != "m1" || got["kept"].Owner != "local:native" {
		t.Errorf("marked record: %+v", got["kept"])
	}
	if _, ok := got["gone"]; ok {
		t.Error("a mark brought a removed record back")
	}

	back := 0
	for i := range 300 {
		id := fmt.Sprintf("race%d", i)
		if err := kv.Put(ctx, "native", id, req); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Go(func() {
			if err := kv.Delete(ctx, "native", id); err != nil {
				t.Error(err)
			}
		})
		wg.Go(func() {
			if err := kv.MarkStarted(ctx, "native", id, marked); err != nil {
				t.Error(err)
			}
		})
		wg.Wait()
	}
	got, err = kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	for id := range got {
		if strings.HasPrefix(id, "race") {
			back++
		}
	}
	if back != 0 {
		t.Errorf("%d of 300 records removed while their mark was written came back", back)
	}
}
