package daemon

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestJetStreamStatus: what STATUS shows for the state bucket's health, and that
// Since is when the state last changed, not when it was last asked.
func TestJetStreamStatus(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		h     state.Health
		state string
		want  string
	}{
		{state.Health{Replicas: 3, Current: 3, Leader: "h1"}, "ok", ""},
		{state.Health{Replicas: 3, Current: 2, Leader: "h1", Lost: []string{"h3"}}, "degraded", "2 of 3 replicas current, lost: h3"},
		{state.Health{Replicas: 3, Current: 1}, "unavailable", "no leader"},
		{state.Health{Replicas: 3, Err: errors.New("context deadline exceeded")}, "unavailable", "no JetStream quorum"},
		{state.Health{Replicas: 1, Current: 1, WriteErr: errors.New("insufficient resources"), WriteSince: t0}, "unavailable", "refuses writes since 2026-01-01T00:00:00Z (insufficient resources)"},
	}
	for _, c := range cases {
		st, _ := jsStatus("nex-N1", c.h, t0)
		if st.State != c.state || !strings.Contains(st.Detail, c.want) {
			t.Errorf("%+v: %s %q, want %s with %q", c.h, st.State, st.Detail, c.state, c.want)
		}
	}
	var w jsWatch
	if w.status() != nil || w.metric() != "" {
		t.Fatal("a fresh watch knows something")
	}
	w.set(jsStatus("b", state.Health{Replicas: 3, Current: 3, Leader: "h1"}, t0))
	w.set(jsStatus("b", state.Health{Replicas: 3, Err: errors.New("timeout")}, t0.Add(5*time.Second)))
	w.set(jsStatus("b", state.Health{Replicas: 3, Err: errors.New("timeout")}, t0.Add(10*time.Second)))
	if st := w.status(); st.State != "unavailable" || !st.Since.Equal(t0.Add(5*time.Second)) || !st.Checked.Equal(t0.Add(10*time.Second)) {
		t.Fatalf("since %v checked %v state %s", st.Since, st.Checked, st.State)
	}
	if w.metric() != "unavailable" {
		t.Fatalf("metric %q", w.metric())
	}
	if err := w.refusal(); err == nil || !strings.Contains(err.Error(), "state store is unavailable") {
		t.Fatalf("unavailable JetStream does not refuse placements: %v", err)
	}
	w.set(jsStatus("b", state.Health{Replicas: 3, Current: 2, Leader: "h1", Lost: []string{"h3"}}, t0.Add(15*time.Second)))
	if err := w.refusal(); err != nil {
		t.Fatalf("degraded (still writable) JetStream refuses placements: %v", err)
	}
}

// writeOutcome is a state bucket's last write outcome for jsWatch (state.KV's in the
// daemon; TestWriteFailureOnFullStore in daemon/state has the real one).
type writeOutcome struct {
	since time.Time
	err   error
}

func (o *writeOutcome) WriteFailure() (time.Time, error) { return o.since, o.err }

func (o *writeOutcome) WriteFailing() <-chan struct{} { return nil }

// TestSingleWriteFailureStopsBidsBriefly: one failed write to the state bucket (a put
// that timed out; the store takes the next) stops the node's bids until a probe write
// takes. The check ran every 5 s, so that was up to 5 s with the store fine (an auction
// then gets no bid from the node); now the probe comes within a second of the failure.
// Real server and bucket, the check's own loop.
func TestSingleWriteFailureStopsBidsBriefly(t *testing.T) {
	ns := testnats.Start(t, testnats.Options{})
	kv, err := state.OpenKV(t.Context(), testnats.Connect(t, ns), "SINGLE", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &server{daemon: &daemon{log: slog.New(slog.DiscardHandler)}, kv: kv}
	s.jetstream.writes = kv
	ctx, cancel := context.WithCancel(t.Context())
	var loop sync.WaitGroup
	loop.Go(func() { s.jetStreamLoop(ctx) })
	defer func() { cancel(); loop.Wait() }()
	for s.jetstream.status() == nil { // the loop's first check is done
		time.Sleep(10 * time.Millisecond)
	}
	expired, stop := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
	defer stop()
	failedAt := time.Now()
	if err := kv.Put(expired, "native", "W1", protocol.StartWorkloadRequest{Name: "w"}); err == nil {
		t.Fatal("a put with an expired deadline succeeded")
	}
	if s.jetstream.bidRefusal() == nil {
		t.Fatal("the node bids right after a failed write")
	}
	refused := 0
	for s.jetstream.bidRefusal() != nil {
		if time.Since(failedAt) > 2*jsProbeEvery {
			t.Fatalf("still no bid %s after one failed write", time.Since(failedAt))
		}
		refused++
		time.Sleep(10 * time.Millisecond)
	}
	// Before: ~5 s (the next round); now jsWriteProbeEvery and one probe write. The
	// bound leaves the rest of the round for a loaded host.
	if took := time.Since(failedAt); took >= jsProbeEvery-time.Second {
		t.Errorf("bids stopped for %s (%d refusals polled) after one failed write with the store taking writes; want about %s", took, refused, jsWriteProbeEvery)
	}
}

// TestBidRefusedWhileWritesFail: the node bids while its bucket takes writes, not once
// a write failed; deploys are refused too once a
// probe confirmed it (unavailable), and neither is once a write succeeded again, before
// the next probe.
func TestBidRefusedWhileWritesFail(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	wo := &writeOutcome{}
	w := jsWatch{writes: wo}
	w.set(jsStatus("b", state.Health{Replicas: 1, Current: 1}, t0))
	if err := w.bidRefusal(); err != nil {
		t.Fatalf("a bucket taking writes refuses bids: %v", err)
	}
	wo.since, wo.err = t0, errors.New("insufficient resources")
	if err := w.bidRefusal(); err == nil || !strings.Contains(err.Error(), "refuses writes") {
		t.Fatalf("a failed write does not stop the bids: %v", err)
	}
	if err := w.refusal(); err != nil {
		t.Fatalf("a deploy is refused before a probe confirmed the failure (it tries its own write): %v", err)
	}
	w.set(jsStatus("b", state.Health{Replicas: 1, Current: 1, WriteErr: wo.err, WriteSince: t0}, t0.Add(5*time.Second)))
	if err := w.refusal(); err == nil || !strings.Contains(err.Error(), "refuses writes") {
		t.Fatalf("a probe's failed write does not refuse deploys: %v", err)
	}
	wo.err = nil // a write took (a retried removal)
	if err := w.refusal(); err != nil {
		t.Fatalf("a deploy is refused after a write succeeded: %v", err)
	}
	if err := w.bidRefusal(); err != nil {
		t.Fatalf("no bid after a write succeeded: %v", err)
	}
}

// BenchmarkBidRefusal is what every auction pays for the state store check (CanBid):
// the status and a real bucket's last write outcome; refusal is the status alone (a
// deploy's CanPlace).
func BenchmarkBidRefusal(b *testing.B) {
	s := testnats.Start(b, testnats.Options{})
	kv, err := state.OpenKV(b.Context(), testnats.Connect(b, s), "BENCH", "", nil)
	if err != nil {
		b.Fatal(err)
	}
	w := jsWatch{writes: kv}
	w.set(jsStatus("b", state.Health{Replicas: 1, Current: 1}, time.Now()))
	b.Run("bidRefusal", func(b *testing.B) {
		for b.Loop() {
			if w.bidRefusal() != nil {
				b.Fatal("refused")
			}
		}
	})
	b.Run("refusal", func(b *testing.B) {
		for b.Loop() {
			if w.refusal() != nil {
				b.Fatal("refused")
			}
		}
	})
}
