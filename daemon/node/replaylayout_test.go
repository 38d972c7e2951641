package node

import (
	"encoding/json"
	"maps"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestReplayOfAnOlderNexdsRecords: a nexlet registering with a node whose state bucket
// (real JetStream) an older nexd wrote, its records under <type>_<id>, beside records
// this nexd wrote under <type>.<id> and records of other types, is handed every record
// of its type, the older nexd's included, each as it was written, and no other. The
// read behind it asks JetStream for the type's keys alone (state
// TestByTypeReadsOnlyItsType); the older records are moved to those keys when nexd
// opens its bucket (state TestOlderNexdsRecordsMovedAndReplayed).
func TestReplayOfAnOlderNexdsRecords(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, srv)
	ctx := t.Context()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	// The bucket as an older nexd left it.
	older, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: state.BucketName("LAYOUTNODE"), History: 1, MaxValueSize: state.MaxValueSize})
	if err != nil {
		t.Fatal(err)
	}
	for key, typ := range map[string]string{"native_OLD1": "native", "native_OLD2": "native", "nativeX_OLD3": "nativeX", "absent_OLD4": "absent"} {
		req := startReq("tenant-a", "was-"+key, `{}`)
		req.WorkloadType = typ
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := older.Put(ctx, key, b); err != nil {
			t.Fatal(err)
		}
	}
	// This nexd's start opens it and records more.
	kv, err := state.OpenKV(ctx, nc, "LAYOUTNODE", "", testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Put(ctx, "native", "NEW1", startReq("tenant-a", "new", `{}`)); err != nil {
		t.Fatal(err)
	}
	other := startReq("tenant-a", "other", `{}`)
	other.WorkloadType = "absent"
	if err := kv.Put(ctx, "absent", "NEW2", other); err != nil {
		t.Fatal(err)
	}
	f := newFixtureOn(t, srv, 1, func(_ int, o *Options) { o.Store = kv })
	a := f.healthyAgent(f.nodes[0], "AGENTNATIVE", "native", "native", nil)
	names := map[string]string{}
	for id, w := range a.resp.ExistingState {
		names[id] = w.Request.Name
	}
	want := map[string]string{"OLD1": "was-native_OLD1", "OLD2": "was-native_OLD2", "NEW1": "new"}
	if !maps.Equal(names, want) {
		t.Fatalf("replayed to the native nexlet: %v, want %v", names, want)
	}
}
