package node

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// TestStopFailureNamesNode: a node says it is stopping a workload it holds (its word
// names it, Nex-Node), and the stop then fails there: the node stops while its nexlet
// has not answered, which cancels the stop's fan-out, and the node answers 500. That
// answer names the node too, as its word and its other stop answers do (61fadcf), so a
// client waiting for the holder's answer takes it for that (nexctl's stop). Before, it
// carried no Nex-Node: the client could not tell it was the holder's answer, and nexctl
// waited out its 5m30s bound for one after the word.
func TestStopFailureNamesNode(t *testing.T) {
	t.Parallel()
	f := newFixture(t, 1, func(_ int, o *Options) { o.StopWait = 3 * time.Second })
	n := f.nodes[0]
	a := f.healthyAgent(n, "A1", "native", "native", nil)
	wid := f.deployOne("default")
	a.mute.Store(true) // a nexlet that does not answer the stop

	inbox := f.client.NewInbox()
	sub, err := f.client.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	req := &nats.Msg{Subject: protocol.UndeploySubject("default", wid), Reply: inbox,
		Data: js(protocol.StopWorkloadRequest{Namespace: "default"}), Header: nats.Header{protocol.HeaderProgress: {"1"}}}
	if err := f.client.PublishMsg(req); err != nil {
		t.Fatal(err)
	}
	word, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no stopping word: %v", err)
	}
	if word.Header.Get(protocol.HeaderProgress) == "" || word.Header.Get(protocol.HeaderNode) != n.ID() {
		t.Fatalf("first reply is not the node's stopping word: %v %q", word.Header, word.Data)
	}
	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stopped <- n.Stop(ctx)
	}()
	m, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no answer after the stopping word once the node stopped: %v", err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("node stop: %v", err)
	}
	if code := m.Header.Get(protocol.HeaderErrorCode); code == "" || code[0] != '5' {
		t.Fatalf("the answer is not a 5xx error: %v %q", m.Header, m.Data)
	}
	if got := m.Header.Get(protocol.HeaderNode); got != n.ID() {
		t.Errorf("the stop's %s answer names node %q, want %s: %v", m.Header.Get(protocol.HeaderErrorCode), got, n.ID(), m.Header)
	}
}
