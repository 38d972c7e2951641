package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestByTypeReadsOnlyItsType: a registering nexlet's replay (ByType) gets every record
// of its type and no other, and JetStream hands the node only those: with 2,000
// records of another type in the bucket, the read of 5 takes a few dozen messages on
// the connection. Before, records were stored as <type>_<id>, one subject token, and
// ByType read the whole bucket for them: 2,005 messages and more.
func TestByTypeReadsOnlyItsType(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	ctx := testCtx(t)
	kv := open(t, testnats.Connect(t, s), "NODE1", "")
	want := map[string][]string{}
	for typ, n := range map[string]int{"absent": 2000, "native": 5, "native_x": 3, "nativeX": 2, "nat": 1} {
		for range n {
			id := nuid.Next()
			if err := kv.Put(ctx, typ, id, request("w-"+id, "ns", typ, "{}")); err != nil {
				t.Fatal(err)
			}
			want[typ] = append(want[typ], id)
		}
	}
	nc := testnats.Connect(t, s) // counted alone
	reader, err := OpenExistingKV(ctx, nc, "NODE1", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{"native", "native_x", "nativeX", "nat", "wasm", "*", ">", "native.*"} {
		before := nc.Stats().InMsgs
		got, err := reader.ByType(ctx, typ)
		if err != nil {
			t.Fatalf("ByType(%q): %v", typ, err)
		}
		msgs := nc.Stats().InMsgs - before
		t.Logf("ByType(%q): %d records, %d messages", typ, len(got), msgs)
		ids := slices.Sorted(maps.Keys(got))
		slices.Sort(want[typ])
		if !slices.Equal(ids, want[typ]) {
			t.Errorf("ByType(%q) = %v, want %v", typ, ids, want[typ])
		}
		for id, req := range got {
			if req.WorkloadType != typ || req.Name != "w-"+id {
				t.Errorf("ByType(%q): record %s is %+v", typ, id, req)
			}
		}
		if msgs > 50 {
			t.Errorf("ByType(%q) of %d records took %d messages from JetStream: it read more than its type's", typ, len(got), msgs)
		}
	}
}

// putOld stores a record as an older nexd did: under <type>_<id>, straight into the bucket.
func putOld(t *testing.T, kv *KV, key string, req protocol.StartWorkloadRequest) {
	t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.kv.Put(testCtx(t), key, b); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

// TestOlderNexdsRecordsMovedAndReplayed: the records an older nexd wrote (<type>_<id>)
// are moved to <type>.<id> when nexd opens its bucket, and are replayed by type with
// their values as written; a move cut short (both keys there, the new one marked since)
// keeps the new record; keys no nexd makes stay where they are; another open moves
// nothing. The moved records are removed by Delete like any other.
func TestOlderNexdsRecordsMovedAndReplayed(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	first := open(t, nc, "NODE1", "")
	oldRec := func(name, typ, owner string) protocol.StartWorkloadRequest {
		r := request(name, "tenant-a", typ, `{"uri":"file:///bin/sleep"}`)
		r.Owner = owner
		return r
	}
	putOld(t, first, "native_OLD1", oldRec("one", "native", "local:native"))
	putOld(t, first, "native_OLD2", oldRec("two", "native", ""))
	putOld(t, first, "native_x_OLD3", oldRec("three", "native_x", ""))
	putOld(t, first, "absent_OLD4", oldRec("four", "absent", ""))
	putOld(t, first, "native_HALF", oldRec("half-old", "native", ""))
	marked := oldRec("half-new", "native", "")
	marked.Started = true
	putOld(t, first, "native.HALF", marked) // the move's create took, its purge did not
	for _, key := range []string{"garbage", "native_x=y"} {
		putOld(t, first, key, oldRec("bad", "native", ""))
	}
	if err := first.Put(ctx, "native", "NEW1", oldRec("new", "native", "")); err != nil {
		t.Fatal(err)
	}

	var logs testkit.Buffer
	kv, err := OpenKV(ctx, nc, "NODE1", "", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	names := func(m map[string]protocol.StartWorkloadRequest) map[string]string {
		out := map[string]string{}
		for k, r := range m {
			out[k] = r.Name
		}
		return out
	}
	got, err := kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{"OLD1": "one", "OLD2": "two", "HALF": "half-new", "NEW1": "new"}; !maps.Equal(names(got), want) {
		t.Fatalf("native's replay after the move: %v, want %v", names(got), want)
	}
	if got["OLD1"].Owner != "local:native" || got["OLD1"].RunRequest != `{"uri":"file:///bin/sleep"}` || !got["HALF"].Started {
		t.Errorf("moved records changed: %+v, %+v", got["OLD1"], got["HALF"])
	}
	if x, err := kv.ByType(ctx, "native_x"); err != nil || !maps.Equal(names(x), map[string]string{"OLD3": "three"}) {
		t.Errorf("native_x's replay: %v, %v", names(x), err)
	}
	all, err := kv.All(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"absent_OLD4", "native_HALF", "native_NEW1", "native_OLD1", "native_OLD2", "native_x_OLD3"}; !slices.Equal(slices.Sorted(maps.Keys(all)), want) {
		t.Errorf("All: %v, want %v", slices.Sorted(maps.Keys(all)), want)
	}
	for _, key := range []string{"native_OLD1", "native_OLD2", "native_x_OLD3", "absent_OLD4", "native_HALF"} {
		if _, err := kv.kv.Get(ctx, key); !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Errorf("old key %s still there after the move: %v", key, err)
		}
	}
	for _, key := range []string{"garbage", "native_x=y"} {
		if _, err := kv.kv.Get(ctx, key); err != nil {
			t.Errorf("key %s, which no nexd makes, was not left in place: %v", key, err)
		}
	}
	if n := strings.Count(logs.String(), "moved the workload records of an older nexd"); n != 1 || !strings.Contains(logs.String(), "records=5") {
		t.Errorf("the move logged %d times, want once with records=5:\n%s", n, logs.String())
	}

	var logs2 testkit.Buffer
	again, err := OpenKV(ctx, nc, "NODE1", "", slog.New(slog.NewTextHandler(&logs2, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs2.String(), "moved") {
		t.Errorf("a second open moved records again:\n%s", logs2.String())
	}
	if err := again.Delete(ctx, "native", "OLD1"); err != nil {
		t.Fatal(err)
	}
	if got, err := again.ByType(ctx, "native"); err != nil || len(got) != 3 || got["OLD1"].Name != "" {
		t.Errorf("after the moved OLD1's removal: %v, %v", names(got), err)
	}
}

// TestProbeIsNoWorkload: the write probe's key is no workload's, even of a type "nexd"
// whose id is "write-probe" (an older nexd's probe key, were it stored as <type>.<id>).
func TestProbeIsNoWorkload(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	ctx := testCtx(t)
	kv := open(t, testnats.Connect(t, s), "NODE1", "")
	if err := kv.Put(ctx, "nexd", "write-probe", request("w", "ns", "nexd", "{}")); err != nil {
		t.Fatal(err)
	}
	if err := kv.ProbeWrite(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := kv.ByType(ctx, "nexd")
	if err != nil || len(got) != 1 || got["write-probe"].Name != "w" {
		t.Fatalf("the workload nexd.write-probe beside the probe: %v, %v", got, err)
	}
	if _, err := kv.kv.Get(ctx, "nexd.write-probe"); err != nil {
		t.Fatalf("the probe's purge touched the workload: %v", err)
	}
}

// TestOpenReadsNoRecords: nexd's opening of its bucket (on its way to READY) takes no
// record from it: with 2,000 records in the bucket, a few dozen messages on the
// connection. Before, it compacted the bucket's delete markers there
// (jetstream's PurgeDeletes), which reads every record: 2,000 messages and more.
func TestOpenReadsNoRecords(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	ctx := testCtx(t)
	kv := open(t, testnats.Connect(t, s), "NODE1", "")
	req := request("w", "ns", "native", "{}")
	for range 2000 {
		if err := kv.Put(ctx, "native", nuid.Next(), req); err != nil {
			t.Fatal(err)
		}
	}
	nc := testnats.Connect(t, s)
	before := nc.Stats().InMsgs
	if _, err := OpenKV(ctx, nc, "NODE1", "", nil); err != nil {
		t.Fatal(err)
	}
	if msgs := nc.Stats().InMsgs - before; msgs > 50 {
		t.Errorf("opening a bucket of 2,000 records took %d messages from JetStream: it read them", msgs)
	}
}

// streamMsgs is how many messages the bucket's stream holds: records and delete markers.
func streamMsgs(t *testing.T, kv *KV) uint64 {
	t.Helper()
	st, err := kv.js.Stream(testCtx(t), "KV_"+kv.bucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// TestAllCompactsOldDeleteMarkers: the node's read of its whole bucket (All, at its
// start) purges the delete markers older than deleteMarkerAge that removed workloads
// left, and no record: not the younger markers, not one written under a marker's key
// after the read, and a read-only KV's (nexctl's) read purges nothing.
func TestAllCompactsOldDeleteMarkers(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	ctx := testCtx(t)
	nc := testnats.Connect(t, s)
	kv := open(t, nc, "NODE1", "")
	putThenRemove(t, ctx, kv, []string{"A", "B", "C"}, []string{"A", "B"})
	ro, err := OpenExistingKV(ctx, nc, "NODE1", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*KV{kv, ro} {
		all, err := r.All(ctx)
		if err != nil || len(all) != 1 || all["native_C"].Name != "w-C" {
			t.Fatalf("All: %v, %v", all, err)
		}
	}
	if n := streamMsgs(t, kv); n != 3 {
		t.Fatalf("%d messages after reads that must purge nothing (markers younger than %s; read-only), want 3", n, deleteMarkerAge)
	}

	kv.markerAge = time.Nanosecond
	if all, err := kv.All(ctx); err != nil || len(all) != 1 {
		t.Fatalf("All: %v, %v", all, err)
	}
	kv.purging.Wait() // the purges go on after All returned
	if n := streamMsgs(t, kv); n != 1 {
		t.Fatalf("%d messages after the node's read, want 1: C's record, the markers purged", n)
	}

	// A workload recorded again under a marker's key between the read and the purge.
	if err := kv.Delete(ctx, "native", "C"); err != nil {
		t.Fatal(err)
	}
	var markers []jetstream.KeyValueEntry
	if err := kv.read(ctx, ">", nil, func(string, string, protocol.StartWorkloadRequest) {}, func(e jetstream.KeyValueEntry) { markers = append(markers, e) }); err != nil || len(markers) != 1 {
		t.Fatalf("markers read: %d, %v", len(markers), err)
	}
	if err := kv.Put(ctx, "native", "C", request("w-C2", "ns", "native", "{}")); err != nil {
		t.Fatal(err)
	}
	kv.purgeMarkers(ctx, markers)
	if got, err := kv.ByType(ctx, "native"); err != nil || got["C"].Name != "w-C2" {
		t.Fatalf("the record written after the read: %v, %v", got, err)
	}
}

// TestMoveOnAFullBucket: an upgraded nexd opens a bucket of an older nexd's records
// that is full (at its byte limit, so the move's create under the new key is refused)
// and still starts: OpenKV takes the bucket, the records left under their old keys are
// replayed (ByType, All), a stop removes one and a job's mark changes one there, and
// once the bucket has room the next open moves the rest, the removed one not back.
// Before, OpenKV failed on the refused create: nexd could not start on a full store it
// starts on when no record is left to move (README: an external store full).
func TestMoveOnAFullBucket(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	// As an older nexd (or upstream) made it, with a small byte limit.
	cfg := jetstream.KeyValueConfig{Bucket: BucketName("NODE1"), History: 1, MaxValueSize: MaxValueSize, MaxBytes: 4096}
	raw, err := js.CreateKeyValue(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := func(i int) protocol.StartWorkloadRequest {
		return request(fmt.Sprintf("w%d", i), "ns", "native", `{"uri":"file:///bin/sleep","pad":"`+strings.Repeat("x", 300)+`"}`)
	}
	n := 0
	for ; n < 100; n++ { // fill it
		b, err := json.Marshal(rec(n))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Put(ctx, fmt.Sprintf("native_OLD%d", n), b); err != nil {
			t.Logf("bucket full after %d records: %v", n, err)
			break
		}
	}
	if n < 3 || n == 100 {
		t.Fatalf("%d records filled the bucket, want 3 to 99", n)
	}

	var logs testkit.Buffer
	kv, err := OpenKV(ctx, nc, "NODE1", "", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("nexd could not open its full bucket of an older nexd's records: %v", err)
	}
	if !strings.Contains(logs.String(), "could not move") {
		t.Errorf("the move cut short by the full bucket was not logged:\n%s", logs.String())
	}
	got, err := kv.ByType(ctx, "native")
	if err != nil || len(got) != n {
		t.Fatalf("native's replay from the full bucket: %d records, %v; want %d", len(got), err, n)
	}
	for i := range n {
		if got[fmt.Sprintf("OLD%d", i)].Name != fmt.Sprintf("w%d", i) {
			t.Errorf("record OLD%d read back as %+v", i, got[fmt.Sprintf("OLD%d", i)])
		}
	}
	if all, err := kv.All(ctx); err != nil || len(all) != n {
		t.Fatalf("All of the full bucket: %d records, %v; want %d", len(all), err, n)
	}

	cfg.MaxBytes = 1 << 20 // room again
	if _, err := js.UpdateKeyValue(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "native", "OLD0"); err != nil {
		t.Fatal(err)
	}
	marked := rec(1)
	marked.Started = true
	if err := kv.MarkStarted(ctx, "native", "OLD1", marked); err != nil {
		t.Fatal(err)
	}
	if got, err := kv.ByType(ctx, "native"); err != nil || len(got) != n-1 || got["OLD0"].Name != "" || !got["OLD1"].Started {
		t.Fatalf("after the stop of OLD0 and the mark of OLD1: %d records (OLD0 %q, OLD1 started %v), %v",
			len(got), got["OLD0"].Name, got["OLD1"].Started, err)
	}

	again, err := OpenKV(ctx, nc, "NODE1", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err = again.ByType(ctx, "native")
	if err != nil || len(got) != n-1 || got["OLD0"].Name != "" || !got["OLD1"].Started {
		t.Fatalf("after the move with room: %d records (OLD0 %q, OLD1 started %v), %v; want %d",
			len(got), got["OLD0"].Name, got["OLD1"].Started, err, n-1)
	}
	for i := range n {
		if _, err := again.kv.Get(ctx, fmt.Sprintf("native_OLD%d", i)); !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Errorf("old key native_OLD%d still there after the move with room: %v", i, err)
		}
	}
}

// TestAllDoesNotWaitForCompaction: the node's start read (All) returns its records
// without waiting for the compaction of the delete markers it passed, which goes on
// beside it until Close: the node's stops and lists wait for that read (the node's
// recorded read), and a compaction of thousands of markers takes seconds (5,000 took
// 1.8 s in process, R1). Here the node's user may not purge the bucket's stream, so
// each purge waits out its request's deadline. Before, All returned only once the
// compaction ended: not within 30 s with a read deadline of 10 minutes.
func TestAllDoesNotWaitForCompaction(t *testing.T) {
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) {
		o.Users = []*server.User{
			{Username: "admin", Password: "a"},
			{Username: "node", Password: "n", Permissions: &server.Permissions{Publish: &server.SubjectPermission{
				Allow: []string{">"}, Deny: []string{"$JS.API.STREAM.PURGE.>"}}}},
		}
	}})
	ctx := testCtx(t)
	connect := func(user, pass string) *nats.Conn {
		nc, err := nats.Connect(s.ClientURL(), nats.UserInfo(user, pass))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	admin := open(t, connect("admin", "a"), "NODE1", "")
	putThenRemove(t, ctx, admin, []string{"A", "B", "C"}, []string{"A", "B"})
	var logs testkit.Buffer
	kv, err := OpenKV(ctx, connect("node", "n"), "NODE1", "", slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	kv.markerAge = time.Nanosecond
	type result struct {
		all map[string]protocol.StartWorkloadRequest
		err error
	}
	done := make(chan result, 1)
	go func() {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		defer cancel()
		all, err := kv.All(rctx)
		done <- result{all, err}
	}()
	select {
	case r := <-done:
		if r.err != nil || len(r.all) != 1 || r.all["native_C"].Name != "w-C" {
			t.Fatalf("All: %v, %v", r.all, r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("All did not return within 30 s: it waits for the compaction of the delete markers it read")
	}
	closed := make(chan struct{})
	go func() { kv.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not end the compaction within 30 s")
	}
	if n := streamMsgs(t, admin); n != 3 {
		t.Errorf("%d messages in the bucket's stream, want 3: C's record and the two markers the node may not purge", n)
	}
	if !strings.Contains(logs.String(), "compact") {
		t.Errorf("the compaction's end is not logged:\n%s", logs.String())
	}
}

// TestDeleteMarkersCompactedWhileRunning: the delete markers that removed workloads
// leave (one each, 128 bytes, counted against the bucket's byte limit) are compacted
// while the node runs, not only by the read at its start: a node that ran for days
// with jobs coming and going filled its bucket with them (100 MB: some 780,000
// removals, nine days at a job a second), and then refused every deploy. Here, after
// the start's read, three workloads recorded and removed: before, their three markers
// stayed until the next start.
func TestDeleteMarkersCompactedWhileRunning(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	ctx := testCtx(t)
	kv := open(t, testnats.Connect(t, s), "NODE1", "")
	kv.markerAge, kv.compactEvery = time.Nanosecond, 100*time.Millisecond
	if _, err := kv.All(ctx); err != nil { // the node's start read
		t.Fatal(err)
	}
	putThenRemove(t, ctx, kv, []string{"A", "B", "C", "D"}, []string{"A", "B", "C"})
	if !testkit.WaitFor(30*time.Second, func() bool { return streamMsgs(t, kv) == 1 }) {
		t.Fatalf("%d messages in the bucket's stream 30 s after three removals, want 1: D's record, the markers compacted", streamMsgs(t, kv))
	}
	if got, err := kv.ByType(ctx, "native"); err != nil || len(got) != 1 || got["D"].Name != "w-D" {
		t.Fatalf("after the compaction: %v, %v", got, err)
	}
}

// putThenRemove stores native workloads w-<id> for put, then removes those of removed,
// each leaving a delete marker.
func putThenRemove(t *testing.T, ctx context.Context, kv *KV, put, removed []string) {
	t.Helper()
	for _, id := range put {
		if err := kv.Put(ctx, "native", id, request("w-"+id, "ns", "native", "{}")); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range removed {
		if err := kv.Delete(ctx, "native", id); err != nil {
			t.Fatal(err)
		}
	}
}
