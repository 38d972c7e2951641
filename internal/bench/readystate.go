package bench

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/protocol"
)

// absentType is the workload type of ready's state records: no nexlet runs it, so no
// start replays them and READY waits for none; the node reads them all at its start
// (their namespaces) and at the native nexlet's registration (its type's, out of all).
const absentType = "nexbenchabsent"

// readyState makes one side's nexd starts use node state in KV (--state kv) with one
// node id for all of them, whose bucket on url holds records workload records first,
// and returns the nexd environment that says so. The records are stored as every nexd
// before the key layout <type>.<id> (and upstream) stored them, <type>_<id>: a nexd
// that keeps the newer layout moves them at its first start, which readyAB does not time,
// so each side is timed on the bucket it keeps; a side of its own, so that neither
// reads the other's layout.
func readyState(ctx context.Context, url string, records int) ([]string, error) {
	kp, err := nkeys.CreateServer()
	if err != nil {
		return nil, err
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, err
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, err
	}
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, fmt.Errorf("state records: %w", err)
	}
	defer nc.Close()
	if _, err := state.OpenKV(ctx, nc, pub, "", nil); err != nil {
		return nil, fmt.Errorf("state records: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("state records: %w", err)
	}
	kv, err := js.KeyValue(ctx, state.BucketName(pub))
	if err != nil {
		return nil, fmt.Errorf("state records: %w", err)
	}
	for i := range records {
		req := protocol.StartWorkloadRequest{
			Name: fmt.Sprintf("rec%d", i), Namespace: "bench", Description: "nexbench ready's state record",
			WorkloadType: absentType, WorkloadLifecycle: "service", Tags: map[string]string{"nexbench": "ready"},
			RunRequest: `{"uri":"file:///usr/local/bin/worker","argv":["--port","8080"],"environment":{"MODE":"prod"}}`,
		}
		b, err := json.Marshal(req)
		if err != nil {
			return nil, err
		}
		if _, err := kv.Put(ctx, absentType+"_"+nuid.Next(), b); err != nil {
			return nil, fmt.Errorf("state records: %d of %d: %w", i, records, err)
		}
	}
	return []string{"NEX_STATE=kv", "NEX_NODE_SEED=" + string(seed)}, nil
}
