package nexlet

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// reregisterOnRefusal is a slog handler that registers the runner again the moment it
// logs a refused workload-ended report: a new node process accepting the nexlet right
// after it refused the report (what make systemd-test saw when nexd was started again
// while a job's report waited to be sent).
type reregisterOnRefusal struct {
	slog.Handler
	r *atomic.Pointer[Runner]
}

func (reregisterOnRefusal) Enabled(context.Context, slog.Level) bool { return true }

func (h reregisterOnRefusal) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Message == "node refused the workload-ended report" {
		if r := h.r.Load(); r != nil {
			_ = r.Reregister()
		}
	}
	return h.Handler.Handle(ctx, rec)
}

// TestEndedReportRefusedThenReregistered: a workload-ended report refused by a node
// process that did not know the nexlet yet, which then registers it, is sent again and
// acknowledged: the resend of Reregister must not rely on a report goroutine that has
// already decided to give up (the job stayed in the node's state for good).
func TestEndedReportRefusedThenReregistered(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	regs := make(chan protocol.RegisterAgentRequest, 4)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	var reports atomic.Int32
	acked := make(chan struct{}, 4)
	_, err := nc.Subscribe(protocol.WorkloadEndedSubject(node, agent, "W1"), func(m *nats.Msg) {
		if reports.Add(1) == 1 { // the new node process does not know the nexlet yet
			rep := nats.NewMsg(m.Reply)
			rep.Header.Set(protocol.HeaderErrorCode, "403")
			rep.Header.Set(protocol.HeaderError, "not registered")
			_ = m.RespondMsg(rep)
			return
		}
		_ = m.Respond([]byte(`{"removed":true}`))
		acked <- struct{}{}
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()

	var rp atomic.Pointer[Runner]
	log := slog.New(reregisterOnRefusal{Handler: slog.DiscardHandler, r: &rp})
	r, err := NewRunner(context.Background(), node, newMemAgent(), WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	<-regs
	rp.Store(r)
	if err := r.EmitEvent("ns", protocol.EventWorkloadStopped, protocol.WorkloadStoppedEvent{ID: "W1", Namespace: "ns", WorkloadType: "mem"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-acked:
	case <-time.After(10 * time.Second):
		t.Fatalf("the refused report was not sent again after the nexlet registered again (%d reports, %d registrations)", reports.Load(), 1+len(regs))
	}
}

// TestEndedReportDuringShutdown: workloads that end while the runner shuts down (a
// nexlet stopping its workloads on its way out) start no report sender that Shutdown
// does not wait for. make test's race detector caught reportEnded's reports.Add racing
// Shutdown's reports.Wait (nexlet/native TestRootWorkloadWhenAllowed): a sender started
// after the Wait outlived the runner, on a drained connection.
func TestEndedReportDuringShutdown(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	regs := make(chan protocol.RegisterAgentRequest, 100)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, regs)
	if _, err := nc.Subscribe(protocol.WorkloadEndedSubject(node, agent, "*"), func(m *nats.Msg) {
		_ = m.Respond([]byte(`{"removed":true}`))
	}); err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	for round := range 20 {
		r, err := NewRunner(context.Background(), node, newMemAgent(), WithLogger(slog.New(slog.DiscardHandler)))
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
			t.Fatal(err)
		}
		<-regs
		stop, emitted := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(emitted)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("W%d-%d", round, i)
				_ = r.EmitEvent("ns", protocol.EventWorkloadStopped, protocol.WorkloadStoppedEvent{ID: id, Namespace: "ns", WorkloadType: "mem"})
			}
		}()
		time.Sleep(time.Millisecond) // some reports in flight as the shutdown begins
		if err := r.Shutdown(); err != nil {
			t.Errorf("round %d: shutdown: %v", round, err)
		}
		// After Shutdown returned, a report must not start a sender at all.
		_ = r.EmitEvent("ns", protocol.EventWorkloadStopped, protocol.WorkloadStoppedEvent{ID: "late", Namespace: "ns", WorkloadType: "mem"})
		r.mu.Lock()
		late := r.unacked["late"]
		sending := late != nil && late.sending
		r.mu.Unlock()
		close(stop)
		<-emitted
		if sending {
			t.Fatalf("round %d: a workload-ended report after Shutdown started a sender", round)
		}
	}
}
