package nexlet

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// TestLocalChannelQueuesManySlowStarts: more starts than the runner handles at once
// (maxInFlight), each slow, with bodies that together fill the socket: the node's
// writes never wait for the runner to take them (a write that waits WriteWait would
// close the channel and lose the answers of the starts already sent), and every start
// is answered on the channel once the agent lets them go. Before, the channel's reader
// waited for a free slot, stopped reading, and the node's write failed.
func TestLocalChannelQueuesManySlowStarts(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, make(chan protocol.RegisterAgentRequest, 1))
	const starts = maxInFlight + 40
	a := &blockingAgent{memAgent: newMemAgent(), entered: make(chan string, starts), release: make(chan struct{})}
	released := false
	release := func() {
		if !released {
			released = true
			close(a.release)
		}
	}
	t.Cleanup(release)
	nodeEnd, nexletEnd, err := localchan.Pair()
	if err != nil {
		t.Fatal(err)
	}
	srvEnd, err := localchan.NewServer(nexletEnd)
	if err != nil {
		t.Fatal(err)
	}
	c, err := localchan.NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r, err := NewRunner(context.Background(), node, a, WithLocalChannel(srvEnd))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { release(); _ = r.Shutdown() })
	testkit.EventuallyWithin(t, 10*time.Second, "the runner announced the channel", c.Serving)
	pad := bytes.Repeat([]byte(" "), 64<<10) // JSON whitespace: 104 starts are 6.5 MiB
	ch := make(chan *nats.Msg, 2*starts)
	for i := range starts {
		id := fmt.Sprintf("W%d", i)
		body, err := protocol.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "n", Namespace: "ns",
			Tags: map[string]string{}, WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "mem", RunRequest: "{}"}})
		if err != nil {
			t.Fatal(err)
		}
		body = append(body, pad...)
		start := time.Now()
		if _, err := c.Request(protocol.StartWorkloadSubject(node, agent, id), nil, body, ch); err != nil {
			t.Fatalf("start %d of %d: %v (after %s)", i+1, starts, err, time.Since(start))
		}
	}
	for i := range maxInFlight {
		select {
		case <-a.entered:
		case m := <-ch:
			t.Fatalf("after %d starts entered: an answer %v %q", i, m.Header, m.Data)
		case <-time.After(10 * time.Second):
			t.Fatalf("%d starts entered the agent, want %d", i, maxInFlight)
		}
	}
	release()
	answered := 0
	timeout := time.After(30 * time.Second)
	for answered < starts {
		select {
		case m := <-ch:
			if e := m.Header.Get("Nats-Service-Error"); e != "" {
				t.Fatalf("a start refused: %s", e)
			}
			if m.Header.Get(protocol.HeaderProgress) == "" || len(m.Data) > 0 {
				answered++
			}
		case <-timeout:
			t.Fatalf("%d of %d starts answered", answered, starts)
		}
	}
}
