package testnats

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
)

// bucketPrefix names a node's state bucket, nex-<node id>: daemon/state's
// BucketPrefix, written out because daemon/state's own tests import this package.
const bucketPrefix = "nex-"

// bucketWait bounds a test's bucket calls (wide: a -race test on a loaded host).
const bucketWait = time.Minute

// Record is a record written into a state bucket: key and raw value.
type Record struct {
	Key   string
	Value []byte
}

// StateBucket opens node nodeID's state bucket (real JetStream, on nc's account), as
// nexd left it.
func StateBucket(t testing.TB, nc *nats.Conn, nodeID string) jetstream.KeyValue {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bucketWait)
	defer cancel()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, bucketPrefix+nodeID)
	if err != nil {
		t.Fatalf("testnats: state bucket of node %s: %v", nodeID, err)
	}
	return kv
}

// NewStateBucket creates the state bucket of a new node id (real JetStream, on nc's
// account) holding records, written in their order, and returns the node id and the
// bucket.
func NewStateBucket(t testing.TB, nc *nats.Conn, records ...Record) (string, jetstream.KeyValue) {
	t.Helper()
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	id, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bucketWait)
	defer cancel()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucketPrefix + id})
	if err != nil {
		t.Fatalf("testnats: create state bucket of node %s: %v", id, err)
	}
	for _, r := range records {
		if _, err := kv.Put(ctx, r.Key, r.Value); err != nil {
			t.Fatalf("testnats: put %s: %v", r.Key, err)
		}
	}
	return id, kv
}
