package node

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// noWaitStop sends a client's stop that does not wait (Nex-Progress, as nexctl workload
// stop --no-wait) and returns the node's first reply and how long it took.
func noWaitStop(t *testing.T, nc *nats.Conn, ns, wid string) (*nats.Msg, time.Duration) {
	t.Helper()
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	began := time.Now()
	m := &nats.Msg{Subject: protocol.UndeploySubject(ns, wid), Reply: inbox, Data: js(protocol.StopWorkloadRequest{Namespace: ns}),
		Header: nats.Header{protocol.HeaderProgress: {"1"}}}
	if err := nc.PublishMsg(m); err != nil {
		t.Fatal(err)
	}
	r, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no reply to the stop: %v", err)
	}
	return r, time.Since(began)
}

// TestNoWaitStopWaitsForOwnersRecord: a client that does not wait is told "stopping"
// once the owning nexlet said it recorded the stop, and only the owner's word counts.
// A rogue nexlet that answers every stop at once with that word (on its own subject or
// the shared one, in the owner's name) cannot make the node say it for a hung owner:
// the word comes after StopRecordTimeout and says, naming the owner, that the stop is
// not confirmed recorded; a hung owner never holds the answer longer. An owner that
// records says so before its stop's grace is over, and the word names it. Before,
// "stopping" went out before the stop was even forwarded, with nothing recorded.
func TestNoWaitStopWaitsForOwnersRecord(t *testing.T) {
	const bound = 600 * time.Millisecond
	forEachRogue(t, func(t *testing.T, shared bool) {
		rf := newRogueFixture(t, func(o *Options) { o.StopRecordTimeout, o.StopTimeout = bound, 3*time.Second })
		acks := func(a *fakeAgent) { a.req.StopAck = true }
		victim := rf.minted("agent0", "native-nexlet", "native", acks)
		rogue := rf.minted("rogue0", "rogue", "rogue", func(a *fakeAgent) { a.req.AnswersDirect = !shared; acks(a) })
		wid := rf.deployOne("tenant")
		victim.mute.Store(true)
		rogue.mute.Store(true)
		p := protocol.AgentPrefix(rogue.nodeID)
		for _, subj := range []string{p + ".STOPWORKLOAD.*", p + "." + rogue.id + ".STOPWORKLOAD.*"} {
			if _, err := rogue.nc.Subscribe(subj, func(m *nats.Msg) {
				_ = m.RespondMsg(&nats.Msg{Header: nats.Header{protocol.HeaderStopRecorded: {victim.id}, protocol.HeaderAgentID: {victim.id}}})
			}); err != nil {
				t.Fatal(err)
			}
		}
		if err := rogue.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		r, took := noWaitStop(t, rf.client, "tenant", wid)
		t.Logf("hung owner, forging rogue: %v after %s", r.Header, took)
		if r.Header.Get(protocol.HeaderProgress) != "stopping" || len(r.Data) != 0 {
			t.Fatalf("first reply %q %v, want the stopping word", r.Data, r.Header)
		}
		if by := r.Header.Get(protocol.HeaderStopRecorded); by != "" {
			t.Errorf("the node says %s recorded the stop: the rogue's forged word was taken", by)
		}
		why := r.Header.Get(protocol.HeaderStopUnrecorded)
		if !strings.Contains(why, victim.id) || !strings.Contains(why, "did not confirm") {
			t.Errorf("the word does not say the owner %s did not confirm the record: %q", victim.id, why)
		}
		if took < bound || took > bound+5*time.Second {
			t.Errorf("the word came after %s, want the bound %s", took, bound)
		}

		// An honest owner, slow to stop (a grace of 2 s): the word comes once it recorded.
		victim.mute.Store(false)
		victim.mu.Lock()
		victim.stopDelay = 2 * time.Second
		victim.mu.Unlock()
		wid2 := rf.deployOne("tenant")
		r, took = noWaitStop(t, rf.client, "tenant", wid2)
		t.Logf("honest owner: %v after %s", r.Header, took)
		if r.Header.Get(protocol.HeaderProgress) != "stopping" || r.Header.Get(protocol.HeaderStopUnrecorded) != "" {
			t.Errorf("first reply %q %v, want the stopping word, recorded", r.Data, r.Header)
		}
		if by := r.Header.Get(protocol.HeaderStopRecorded); by == "" || took >= 2*time.Second {
			t.Errorf("the word (recorded by %q) came after %s, want the owner's record before its grace", by, took)
		}
	})
}
