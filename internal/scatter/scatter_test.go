package scatter

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
)

func TestGather(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	// Three responders; the third answers late, after the stall.
	for i, delay := range []time.Duration{0, 10 * time.Millisecond, 3 * time.Second} {
		resp := testnats.Connect(t, s)
		d, id := delay, byte('a'+i)
		resp.Subscribe("svc", func(m *nats.Msg) {
			go func() {
				time.Sleep(d)
				m.Respond([]byte{id})
			}()
		})
		resp.Flush()
	}
	ctx := context.Background()
	tests := []struct {
		name string
		o    Options
		want int
	}{
		{"ends when answers stop", Options{First: 5 * time.Second, Stall: time.Second}, 2},
		{"max", Options{First: 5 * time.Second, Stall: 10 * time.Second, Max: 1}, 1},
		{"waits out a long stall", Options{First: 5 * time.Second, Stall: 6 * time.Second}, 3},
	}
	for _, tc := range tests {
		got, err := Gather(ctx, nc, "svc", nil, tc.o)
		if err != nil || len(got) != tc.want {
			t.Errorf("%s: %d replies, %v; want %d", tc.name, len(got), err, tc.want)
		}
	}
	// No responders ends the gather at once: with an hour's first-reply bound, only
	// that keeps this from hanging until the test times out.
	got, err := Gather(ctx, nc, "nobody.listens", nil, Options{First: time.Hour, Stall: time.Second})
	if err != nil || len(got) != 0 {
		t.Fatalf("no responders: %d, %v", len(got), err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Gather(cctx, nc, "svc", nil, Options{First: time.Second, Stall: time.Second}); err == nil {
		t.Fatal("cancelled context not reported")
	}
}
