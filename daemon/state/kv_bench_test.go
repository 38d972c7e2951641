package state

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testnats"
)

// BenchmarkKVPut stores one start request per op in a node's bucket on a real
// in-process JetStream (file storage), as the node does on every deploy with --state kv.
func BenchmarkKVPut(b *testing.B) {
	s := testnats.Start(b, testnats.Options{})
	nc := testnats.Connect(b, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	kv, err := OpenKV(ctx, nc, "BENCHNODE", "", nil)
	if err != nil {
		b.Fatal(err)
	}
	req := request("bench", "system", "native", `{"uri":"file:///usr/local/bin/worker","argv":["--port","8080"],"environment":{"MODE":"prod"}}`)
	b.ReportAllocs()
	for b.Loop() {
		if err := kv.Put(ctx, "native", nuid.Next(), req); err != nil {
			b.Fatal(err)
		}
	}
}
