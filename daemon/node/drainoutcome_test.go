package node

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// drainClient sends LAMEDUCK to n with HeaderDrainWait nonce on an inbox of its own and
// returns the answer and the inbox's later messages.
func drainClient(t *testing.T, f *fixture, n *Node, delay, nonce string) (protocol.LameduckResponse, chan *nats.Msg) {
	t.Helper()
	inbox := f.client.NewInbox()
	ch := make(chan *nats.Msg, 8)
	sub, err := f.client.ChanSubscribe(inbox, ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	err = f.client.PublishMsg(&nats.Msg{Subject: protocol.LameduckSubject(n.ID()), Reply: inbox,
		Data: mustJSON(t, protocol.LameduckRequest{Delay: delay}), Header: nats.Header{protocol.HeaderDrainWait: {nonce}}})
	if err != nil {
		t.Fatal(err)
	}
	return lameduckReply(t, ch), ch
}

func lameduckReply(t *testing.T, ch chan *nats.Msg) protocol.LameduckResponse {
	t.Helper()
	select {
	case m := <-ch:
		var r protocol.LameduckResponse
		if err := json.Unmarshal(m.Data, &r); err != nil {
			t.Fatalf("lameduck reply %q (%v): %v", m.Data, m.Header, err)
		}
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no lameduck reply")
	}
	return protocol.LameduckResponse{}
}

// checkTold checks that r carries the node's signed word with state (and a reason
// containing reason) for nonce.
func checkTold(t *testing.T, n *Node, nonce string, r protocol.LameduckResponse, state, reason string) {
	t.Helper()
	if r.Drain == nil {
		t.Fatalf("%+v: no nexd_drain", r)
	}
	if err := protocol.VerifyDrain(n.ID(), nonce, *r.Drain); err != nil {
		t.Fatalf("%+v: %v", r.Drain, err)
	}
	if r.Drain.State != state || !strings.Contains(r.Drain.Reason, reason) || (reason == "") != (r.Drain.Reason == "") {
		t.Fatalf("drain %+v, want state %q reason with %q", r.Drain, state, reason)
	}
	if r.Success != (state != protocol.DrainFailed) {
		t.Errorf("success %v for state %s", r.Success, state)
	}
}

// TestDrainOutcomeTold: a client that asks (HeaderDrainWait) is promised the drain's
// outcome in the LAMEDUCK answer, and told it once the drain ends, signed by the node
// over its nonce: drained after a clean drain; failed, naming the workload and the
// nexlet's words, when a nexlet could not stop one; failed when the node stops before
// its drain ran. A second client in lame duck is promised too. Without the header the
// answer is upstream's; a malformed nonce is refused before anything changes.
func TestDrainOutcomeTold(t *testing.T) {
	t.Parallel()
	t.Run("clean", func(t *testing.T) {
		f, n := oneNode(t)
		f.healthyAgent(n, "AGENTNATIVE", "native", "native", func(a *fakeAgent) {
			a.workloads["W1"] = startReq(protocol.SystemNamespace, "w1", "")
		})
		checkTold(t, n, "nonce-1", mustLameduck(t, f, n, "nonce-1"), protocol.DrainDraining, "")
		r2, ch2 := drainClient(t, f, n, "1h", "nonce2")
		checkTold(t, n, "nonce2", r2, protocol.DrainDraining, "")
		if !strings.Contains(r2.Message, "already in lameduck") {
			t.Errorf("second answer %q", r2.Message)
		}
		if _, err := n.DrainWorkloads(t.Context()); err != nil {
			t.Fatal(err)
		}
		checkTold(t, n, "nonce2", lameduckReply(t, ch2), protocol.DrainDrained, "")
	})
	t.Run("stop failed", func(t *testing.T) {
		f, n := oneNode(t)
		f.healthyAgent(n, "AGENTNATIVE", "native", "native", func(a *fakeAgent) {
			a.workloads["WSTUCK"] = startReq(protocol.SystemNamespace, "stuck", "")
			a.failStop = "cannot stop: device busy"
		})
		_, ch := drainClient(t, f, n, "0s", "n3")
		if _, err := n.DrainWorkloads(t.Context()); err == nil {
			t.Fatal("drain with a failed stop: no error")
		}
		checkTold(t, n, "n3", lameduckReply(t, ch), protocol.DrainFailed, "drain workload WSTUCK: cannot stop: device busy")
	})
	t.Run("stopped before the drain", func(t *testing.T) {
		f, n := oneNode(t)
		_, ch := drainClient(t, f, n, "1h", "n4")
		if err := n.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
		checkTold(t, n, "n4", lameduckReply(t, ch), protocol.DrainFailed, "stopped before its lame duck drain")
	})
	t.Run("upstream and bad nonce", func(t *testing.T) {
		f, n := oneNode(t)
		m, err := f.client.RequestMsg(&nats.Msg{Subject: protocol.LameduckSubject(n.ID()), Data: []byte(`{"delay":"1h"}`),
			Header: nats.Header{protocol.HeaderDrainWait: {"no spaces"}}}, 10*time.Second)
		if err != nil || m.Header.Get(protocol.HeaderErrorCode) != "400" || !strings.Contains(m.Header.Get(protocol.HeaderError), "Nex-Drain-Wait") {
			t.Fatalf("bad nonce: %v %v %q", err, m.Header, m.Data)
		}
		if in, _ := n.Lameduck(); in {
			t.Fatal("a refused request put the node in lame duck mode")
		}
		m = request(t, f.client, protocol.LameduckSubject(n.ID()), protocol.LameduckRequest{Delay: "1h"})
		var o map[string]any
		if err := json.Unmarshal(m.Data, &o); err != nil || len(o) != 2 || o["success"] != true {
			t.Fatalf("plain lameduck answer %s: want upstream's message and success only", m.Data)
		}
	})
}

// oneNode is a parallel subtest's node on a server of its own.
func oneNode(t *testing.T) (*fixture, *Node) {
	t.Parallel()
	f := newFixture(t, 1, nil)
	return f, f.nodes[0]
}

func mustLameduck(t *testing.T, f *fixture, n *Node, nonce string) protocol.LameduckResponse {
	t.Helper()
	r, _ := drainClient(t, f, n, "1h", nonce)
	return r
}

// TestLastDrainKeptUntilNextLameduck: the drain's outcome outlives the node that drained
// (it stops right after, and its clients are told for DrainTellFor at most): the next
// node on the same state directory answers it in INFO (nexd_last_drain), with no expiry,
// until its own lame duck begins, which forgets it; that drain's outcome replaces it,
// one file in all. A stop without a lame duck keeps none. Before, the outcome lived
// only in the draining process: a client that missed those 10 s never learnt it.
func TestLastDrainKeptUntilNextLameduck(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "last-drain.json")
	keep := func(_ int, o *Options) { o.DrainOutcomeFile = file }
	f := newFixture(t, 1, keep)
	n := f.nodes[0]
	if d := n.Info().LastDrain; d != nil {
		t.Fatalf("a fresh node has a last drain: %+v", d)
	}
	f.healthyAgent(n, "AGENTNATIVE", "native", "native", func(a *fakeAgent) {
		a.workloads["WSTUCK"] = startReq(protocol.SystemNamespace, "stuck", "")
		a.failStop = "cannot stop: device busy"
	})
	mustLameduck(t, f, n, "n1")
	if _, err := n.DrainWorkloads(t.Context()); err == nil {
		t.Fatal("drain with a failed stop: no error")
	}
	if err := n.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}

	// The next run: a client that lost the outcome asks after the node stopped.
	f2 := newFixture(t, 1, keep)
	n2 := f2.nodes[0]
	d := n2.Info().LastDrain
	if d == nil || d.State != protocol.DrainFailed || !strings.Contains(d.Reason, "cannot stop: device busy") || time.Since(d.At) > time.Minute {
		t.Fatalf("the next node's INFO last drain %+v, want the failed drain naming its stop's failure", d)
	}
	reply := request(t, f2.client, protocol.InfoSubject(n2.ID()), map[string]any{})
	var info protocol.NodeInfoResponse
	if err := json.Unmarshal(reply.Data, &info); err != nil || info.LastDrain == nil || info.LastDrain.State != protocol.DrainFailed {
		t.Fatalf("INFO over NATS: %s (%v), want nexd_last_drain failed", reply.Data, err)
	}
	if _, err := n2.EnterLameduck(time.Hour); err != nil {
		t.Fatal(err)
	}
	if d := n2.Info().LastDrain; d != nil {
		t.Errorf("a new lame duck still shows the last drain: %+v", d)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("the kept outcome is still there once a new lame duck began: %v", err)
	}
	if _, err := n2.DrainWorkloads(t.Context()); err != nil {
		t.Fatal(err)
	}
	if d := n2.LastDrain(); d == nil || d.State != protocol.DrainDrained {
		t.Errorf("after the second drain: %+v, want drained", d)
	}
	if err := n2.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("%d files kept for the drains, want 1: %v", len(ents), ents)
	}

	// A stop without a lame duck keeps nothing new: the last drain stays as it was.
	f3 := newFixture(t, 1, keep)
	if err := f3.nodes[0].Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	f4 := newFixture(t, 1, keep)
	if d := f4.nodes[0].Info().LastDrain; d == nil || d.State != protocol.DrainDrained {
		t.Errorf("after a plain stop: %+v, want the drained outcome kept", d)
	}
}

// FuzzDrainOutcome: whatever the drain outcome file holds, parseDrainOutcome refuses
// it or returns an outcome INFO and STATUS may show: drained or failed, with a time, a
// reason of at most protocol.MaxDrainReason bytes (and the cut's "…"), that reads back
// the same once written again.
func FuzzDrainOutcome(f *testing.F) {
	f.Add([]byte(`{"state":"failed","reason":"cannot stop: device busy","at":"2026-12-05T04:00:00Z"}`))
	f.Add([]byte(`{"state":"drained","at":"2026-12-05T04:00:00Z"}`))
	f.Add([]byte(`{"state":"draining","at":"2026-12-05T04:00:00Z"}`))
	f.Add([]byte(`{"state":"failed\u001b[2J","at":"2026-12-05T04:00:00Z"}`))
	f.Add([]byte(`{"state":"failed"}`))
	f.Add([]byte(`{"state":"failed","reason":"` + strings.Repeat("é", 3000) + `","at":"2026-12-05T04:00:00Z"}`))
	f.Add([]byte(`{"state":"drained","at":"2026-12-05T04:00:00Z"}` + strings.Repeat(" ", maxDrainOutcomeFile)))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := parseDrainOutcome(bytes.NewReader(b))
		if err != nil {
			if d != nil {
				t.Fatalf("error %v with %+v", err, d)
			}
			return
		}
		if len(b) > maxDrainOutcomeFile {
			t.Fatalf("%d bytes read whole", len(b))
		}
		if d.State != protocol.DrainDrained && d.State != protocol.DrainFailed || d.At.IsZero() ||
			len(d.Reason) > protocol.MaxDrainReason+len("…") {
			t.Fatalf("accepted %+q", *d)
		}
		again, _ := json.Marshal(d)
		d2, err := parseDrainOutcome(bytes.NewReader(again))
		if err != nil || d2.State != d.State || !d2.At.Equal(d.At) || len(d2.Reason) > len(d.Reason) {
			t.Fatalf("written again %s: %+v, %v", again, d2, err)
		}
	})
}
