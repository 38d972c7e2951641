package state

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// benchKV opens a node's bucket on a real in-process JetStream (file storage) and
// returns it with a start request to store.
func benchKV(b *testing.B) (context.Context, *KV, protocol.StartWorkloadRequest) {
	s := testnats.Start(b, testnats.Options{})
	nc := testnats.Connect(b, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	b.Cleanup(cancel)
	kv, err := OpenKV(ctx, nc, "BENCHNODE", "", nil)
	if err != nil {
		b.Fatal(err)
	}
	return ctx, kv, request("bench", "system", "native", `{"uri":"file:///usr/local/bin/worker","argv":["--port","8080"],"environment":{"MODE":"prod"}}`)
}

// BenchmarkKVPut stores one start request per op in a node's bucket, as the node does
// on every deploy with --state kv.
func BenchmarkKVPut(b *testing.B) {
	ctx, kv, req := benchKV(b)
	b.ReportAllocs()
	for b.Loop() {
		if err := kv.Put(ctx, "native", nuid.Next(), req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkKVDelete removes one stored start request per op, as the node does before it
// answers a stop (the store's Get, then its Purge): what a stop's answer waits for on
// top of the nexlet's.
func BenchmarkKVDelete(b *testing.B) {
	ctx, kv, req := benchKV(b)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		id := nuid.Next()
		if err := kv.Put(ctx, "native", id, req); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := kv.Delete(ctx, "native", id); err != nil {
			b.Fatal(err)
		}
	}
}
