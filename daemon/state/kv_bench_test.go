package state

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// benchKV opens a node's bucket on a real in-process JetStream (file storage) and
// returns it with a start request to store.
func benchKV(b *testing.B) (context.Context, *KV, protocol.StartWorkloadRequest) {
	ctx, kv, req, _ := benchKVConn(b)
	return ctx, kv, req
}

// benchKVConn is benchKV with the connection the bucket was opened on.
func benchKVConn(b *testing.B) (context.Context, *KV, protocol.StartWorkloadRequest, *nats.Conn) {
	s := testnats.Start(b, testnats.Options{})
	nc := testnats.Connect(b, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	b.Cleanup(cancel)
	kv, err := OpenKV(ctx, nc, "BENCHNODE", "", nil)
	if err != nil {
		b.Fatal(err)
	}
	return ctx, kv, request("bench", "system", "native", `{"uri":"file:///usr/local/bin/worker","argv":["--port","8080"],"environment":{"MODE":"prod"}}`), nc
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

// benchRecordCounts are the other types' records in the bucket of BenchmarkKVByType and
// BenchmarkKVOpen, as nexbench ready --state-records lays them out.
var benchRecordCounts = []int{0, 1000, 5000}

// fillBench stores n records of a type no nexlet runs and own records of "native".
func fillBench(b *testing.B, ctx context.Context, kv *KV, req protocol.StartWorkloadRequest, n, own int) {
	b.Helper()
	other := req
	other.WorkloadType = "absent"
	for range n {
		if err := kv.Put(ctx, "absent", nuid.Next(), other); err != nil {
			b.Fatal(err)
		}
	}
	for range own {
		if err := kv.Put(ctx, "native", nuid.Next(), req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkKVByType is the read a registering nexlet's replay makes (ByType: its
// type's records, 10 here) in a bucket that also holds records=N of another type: on
// the native nexlet's way to READY=1 at every start of nexd.
func BenchmarkKVByType(b *testing.B) {
	for _, records := range benchRecordCounts {
		b.Run(fmt.Sprintf("records=%d", records), func(b *testing.B) {
			ctx, kv, req := benchKV(b)
			fillBench(b, ctx, kv, req, records, 10)
			b.ReportAllocs()
			for b.Loop() {
				got, err := kv.ByType(ctx, "native")
				if err != nil || len(got) != 10 {
					b.Fatalf("ByType: %d records, %v; want 10", len(got), err)
				}
			}
		})
	}
}

// BenchmarkKVOpen is nexd's opening of its bucket (OpenKV: on its way to READY=1) when
// the bucket holds records=N.
func BenchmarkKVOpen(b *testing.B) {
	for _, records := range benchRecordCounts {
		b.Run(fmt.Sprintf("records=%d", records), func(b *testing.B) {
			ctx, kv, req, nc := benchKVConn(b)
			fillBench(b, ctx, kv, req, records, 10)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := OpenKV(ctx, nc, "BENCHNODE", "", nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
