package scatter

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
)

// BenchmarkGather is one gather of n replies (Max n ends it, so no stall is timed):
// its allocations are what a nexctl or nexbench call costs the client.
func BenchmarkGather(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("responders=%d", n), func(b *testing.B) {
			s := testnats.Start(b, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(b, s)
			resp := testnats.Connect(b, s)
			for range n {
				if _, err := resp.Subscribe("svc", func(m *nats.Msg) { _ = m.Respond([]byte("x")) }); err != nil {
					b.Fatal(err)
				}
			}
			if err := resp.Flush(); err != nil {
				b.Fatal(err)
			}
			o := Options{First: 5 * time.Second, Stall: time.Second, Max: n}
			b.ReportAllocs()
			for b.Loop() {
				got, err := Gather(b.Context(), nc, "svc", nil, o)
				if err != nil || len(got) != n {
					b.Fatalf("%d replies, %v; want %d", len(got), err, n)
				}
			}
		})
	}
}
