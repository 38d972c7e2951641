package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// BenchmarkNodeStart is the node's Start (on nexd's way to READY=1) with 0, 1,000 and
// 5,000 workloads in its node state bucket (real in-process JetStream, file storage),
// whose namespaces the node reads at its start; "then-stop" adds a stop of one of them
// from another namespace, which needs that read: what a tenant's first stop right after
// a restart waits for.
func BenchmarkNodeStart(b *testing.B) {
	for _, records := range []int{0, 1000, 5000} {
		b.Run(fmt.Sprintf("records=%d", records), func(b *testing.B) {
			srv := testnats.Start(b, testnats.Options{})
			nc := testnats.Connect(b, srv)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			b.Cleanup(cancel)
			kp, err := nkeys.CreateServer()
			if err != nil {
				b.Fatal(err)
			}
			pub, err := kp.PublicKey()
			if err != nil {
				b.Fatal(err)
			}
			kv, err := state.OpenKV(ctx, nc, pub, "", nil)
			if err != nil {
				b.Fatal(err)
			}
			var some string
			for i := range records {
				some = nuid.Next()
				req := protocol.StartWorkloadRequest{
					Name: fmt.Sprintf("w%d", i), Namespace: "tenant-a", WorkloadType: "native",
					WorkloadLifecycle: "service", RunRequest: benchRunRequest, Tags: map[string]string{"a": "b"},
				}
				if err := kv.Put(ctx, "native", some, req); err != nil {
					b.Fatal(err)
				}
			}
			xk, err := nkeys.CreateCurveKeys()
			if err != nil {
				b.Fatal(err)
			}
			o := Options{
				NC: nc, NodeKey: kp, XKey: xk, Name: "bench", Nexus: "bench", Version: "0.1.0",
				Minter: testMinter{url: srv.ClientURL(), can: true}, Store: kv, Logger: testLogger(b),
				HeartbeatInterval: time.Second, HealthTick: time.Second,
				FanoutTimeout: 2 * time.Second, CloneTimeout: time.Second,
			}
			run := func(b *testing.B, thenStop bool) {
				b.ReportAllocs()
				for b.Loop() {
					n, err := New(o)
					if err != nil {
						b.Fatal(err)
					}
					if err := n.Start(ctx); err != nil {
						b.Fatal(err)
					}
					if thenStop && records > 0 {
						resp, err := n.stopWorkloadSaying(ctx, "tenant-b", some, nil, false)
						if err != nil || resp.Message != protocol.ErrTextWorkloadNotFound {
							b.Fatalf("tenant-b's stop of a recorded tenant-a workload: %+v, %v", resp, err)
						}
					}
					b.StopTimer()
					if err := n.Stop(ctx); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			}
			b.Run("start", func(b *testing.B) { run(b, false) })
			b.Run("then-stop", func(b *testing.B) { run(b, true) })
		})
	}
}
