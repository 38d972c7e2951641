package daemon

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/natsembed"
	"github.com/nexd-project/nexd/daemon/state"
)

// A node's own server may answer (so the connection is "connected") while it has lost
// its cluster: a partition leaves it without routes, and JetStream on its side without
// a quorum, so state cannot be written. The node asks JetStream about its state bucket
// every jsProbeEvery and shows the answer in STATUS, nexctl status and the metrics.
// While the bucket's writes fail, the probe (with its write) runs every
// jsWriteProbeEvery instead, so the node bids again within about a second of the store
// taking writes, also when nothing else writes.
const (
	jsProbeEvery      = 5 * time.Second
	jsWriteProbeEvery = time.Second
	jsProbeTimeout    = 3 * time.Second
)

// jsWatch holds the last answer.
type jsWatch struct {
	mu       sync.Mutex
	last     *control.JetStreamStatus
	byWrites bool // last is unavailable only because the bucket refused writes

	// writes is the state bucket's last write outcome (nil without a KV bucket).
	writes interface {
		WriteFailure() (since time.Time, err error)
		WriteFailing() <-chan struct{}
	}
}

// status is the last answer (nil before the first, or without a KV bucket).
func (w *jsWatch) status() *control.JetStreamStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.last == nil {
		return nil
	}
	c := *w.last
	return &c
}

// metric is the state for the metrics ("" when unknown).
func (w *jsWatch) metric() string {
	if st := w.status(); st != nil {
		return st.State
	}
	return ""
}

// set records a probe's answer and returns the previous state.
func (w *jsWatch) set(st control.JetStreamStatus, byWrites bool) (prev string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.byWrites = byWrites
	if w.last != nil {
		prev = w.last.State
		st.Since = w.last.Since
	}
	if prev != st.State {
		st.Since = st.Checked
	}
	w.last = &st
	return prev
}

// refusal is why no workload can be placed now: the state bucket's JetStream is
// unavailable, so a deploy could not be recorded (nil otherwise, also before the first
// answer). Unavailable only because the bucket refused writes, it refuses until a
// write succeeds (a workload's or a probe's), not until the next probe.
func (w *jsWatch) refusal() error {
	w.mu.Lock() // not status(): no copy, asked before every bid
	if w.last == nil || w.last.State != "unavailable" {
		w.mu.Unlock()
		return nil
	}
	since, detail, byWrites := w.last.Since, w.last.Detail, w.byWrites
	w.mu.Unlock()
	if byWrites {
		if _, err := w.writeFailure(); err == nil {
			return nil
		}
	}
	return fmt.Errorf("the node's state store is unavailable since %s: %s", since.Format(time.RFC3339), detail)
}

// bidRefusal is why the node does not bid now: refusal's, or the state bucket's last
// write failed. A full or failing store still answers JetStream's health (stream info)
// while it refuses every write, and a node that bid then refused the deploys it won
// (503, not started). Asked before every bid: the status's mutex and one atomic load
// (BenchmarkBidRefusal). Meanwhile jetStreamLoop probes every second with a write,
// which ends the refusal once one takes.
func (w *jsWatch) bidRefusal() error {
	if err := w.refusal(); err != nil {
		return err
	}
	since, err := w.writeFailure()
	if err == nil {
		return nil
	}
	return fmt.Errorf("the node's state store refuses writes (since %s): %w", since.UTC().Format(time.RFC3339), err)
}

func (w *jsWatch) writeFailure() (time.Time, error) {
	if w.writes == nil {
		return time.Time{}, nil
	}
	return w.writes.WriteFailure()
}

// canPlace is every check, in order.
func canPlace(checks ...func() error) func() error {
	return func() error {
		for _, c := range checks {
			if err := c(); err != nil {
				return err
			}
		}
		return nil
	}
}

// jsStatus turns a bucket's health into what STATUS shows; byWrites when it is
// unavailable only because the bucket refuses writes.
func jsStatus(bucket string, h state.Health, at time.Time) (st control.JetStreamStatus, byWrites bool) {
	st = control.JetStreamStatus{Bucket: bucket, Replicas: h.Replicas, Current: h.Current, Leader: h.Leader, Checked: at.UTC()}
	defer func() {
		if h.WriteErr != nil && st.State != "unavailable" {
			st.State, byWrites = "unavailable", true
			st.Detail = fmt.Sprintf("state bucket %s refuses writes since %s (%v): its store is full or failing; the node does not bid, and deploys and stops cannot be recorded", bucket, h.WriteSince.UTC().Format(time.RFC3339), h.WriteErr)
		}
	}()
	switch {
	case h.Err != nil:
		st.State = "unavailable"
		st.Detail = fmt.Sprintf("JetStream did not answer for state bucket %s (%v): this server has no JetStream quorum (cut off from its cluster?); deploys and stops cannot be recorded", bucket, h.Err)
	case h.Leader == "" && h.Replicas > 1:
		st.State = "unavailable"
		st.Detail = fmt.Sprintf("state bucket %s has no leader (%d of %d replicas current)", bucket, h.Current, h.Replicas)
	case h.Current < h.Replicas:
		st.State = "degraded"
		st.Detail = fmt.Sprintf("state bucket %s: %d of %d replicas current, lost: %s", bucket, h.Current, h.Replicas, strings.Join(h.Lost, ", "))
	default:
		st.State = "ok"
	}
	return st, byWrites
}

// probeJetStream asks once and logs a change.
func (s *server) probeJetStream(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, jsProbeTimeout)
	h := s.kv.Health(pctx)
	cancel()
	if ctx.Err() != nil {
		return
	}
	st, byWrites := jsStatus(s.kv.Bucket(), h, time.Now())
	prev := s.jetstream.set(st, byWrites)
	switch {
	case prev == st.State:
	case st.State == "ok" && prev != "":
		s.log.Info("JetStream state bucket healthy again", "bucket", st.Bucket, "replicas", st.Replicas, "leader", st.Leader, "was", prev)
	case st.State != "ok":
		s.log.Warn("JetStream state bucket "+st.State, "bucket", st.Bucket, "detail", st.Detail)
	}
}

// jetStreamLoop probes until ctx ends (only with a KV bucket): every jsProbeEvery, every
// jsWriteProbeEvery while the bucket's writes fail.
func (s *server) jetStreamLoop(ctx context.Context) {
	for {
		s.probeJetStream(ctx)
		every := jsProbeEvery
		if _, err := s.jetstream.writeFailure(); err != nil {
			every = jsWriteProbeEvery
		}
		t := time.NewTimer(every)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
			continue
		case <-s.kv.WriteFailing():
			// A write failed since this probe: bids stopped at once (bidRefusal), so the
			// probe that ends the refusal comes within a second, not at the next round
			// (TestSingleWriteFailureStopsBidsBriefly).
			t.Stop()
		}
		if !sleepCtx(ctx, jsWriteProbeEvery) {
			return
		}
	}
}

// leafStatus is the embedded server's leaf connections (nil without remotes).
func (s *server) leafStatus() *control.LeafStatus {
	srv, ok := s.conn.InProcess().(*natsembed.Server)
	if !ok || srv == nil {
		return nil
	}
	remotes, up := srv.Leafs()
	if remotes == 0 {
		return nil
	}
	return &control.LeafStatus{Remotes: remotes, Connected: min(up, remotes)}
}
