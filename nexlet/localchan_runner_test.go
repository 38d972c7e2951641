package nexlet

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

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
	c, srvEnd := localPair(t)
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

// localNode answers registrations on the node's end c as fakeNode does over NATS,
// refusing with code when it is set; got receives each.
func localNode(c *localchan.Client, url, code string, got chan<- *localchan.Call) {
	c.OnCall(func(call *localchan.Call) {
		got <- call
		if code != "" {
			_ = call.Reply(&nats.Msg{Header: nats.Header{protocol.HeaderErrorCode: {code}, protocol.HeaderError: {"refused"}}})
			return
		}
		b, _ := json.Marshal(protocol.RegisterAgentResponse{Success: true, NodeID: node,
			ConnectionData: protocol.NatsConnectionData{NatsServers: []string{url}}})
		_ = call.Reply(&nats.Msg{Data: b})
	})
}

func localPair(t *testing.T) (*localchan.Client, *localchan.Server) {
	t.Helper()
	nodeEnd, nexletEnd, err := localchan.Pair()
	if err != nil {
		t.Fatal(err)
	}
	s, err := localchan.NewServer(nexletEnd)
	if err != nil {
		t.Fatal(err)
	}
	c, err := localchan.NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, s
}

// TestRegisterOnLocalChannel: with WithLocalRegistration the runner registers on the
// channel, signed as over NATS, and nothing reaches the node's NATS subject; the
// channel then carries its starts. Without it (a node that did not say it serves
// calls), the registration goes over NATS as before.
func TestRegisterOnLocalChannel(t *testing.T) {
	for _, local := range []bool{true, false} {
		t.Run(fmt.Sprintf("local=%v", local), func(t *testing.T) {
			srv := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, srv)
			overNATS := make(chan protocol.RegisterAgentRequest, 1)
			fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, overNATS)
			c, s := localPair(t)
			onChannel := make(chan *localchan.Call, 1)
			localNode(c, srv.ClientURL(), "", onChannel)
			kp, _ := nkeys.CreateUser()
			opts := []Option{WithLocalChannel(s), WithRegistrationKey(kp), WithPatientStart()}
			if local {
				opts = append(opts, WithLocalRegistration())
			}
			r, err := NewRunner(context.Background(), node, newMemAgent(), opts...)
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = r.Shutdown() })
			if !local {
				select {
				case <-overNATS:
				default:
					t.Fatal("no registration over NATS")
				}
				if len(onChannel) != 0 {
					t.Fatal("a registration on the channel of a node that does not serve calls")
				}
				return
			}
			if len(overNATS) != 0 {
				t.Fatal("the registration crossed NATS")
			}
			call := <-onChannel
			pub, _ := kp.PublicKey()
			sig, _ := base64.StdEncoding.DecodeString(call.Header.Get(protocol.HeaderRegistrationSig))
			if call.Subject != protocol.RegisterSubject(node, agent) || call.Header.Get(protocol.HeaderRegistrationKey) != pub ||
				kp.Verify(protocol.RegistrationPayload(call.Subject, call.Header.Get(protocol.HeaderRegistrationTime), call.Data), sig) != nil {
				t.Fatalf("registration on the channel not signed as over NATS: %s %v", call.Subject, call.Header)
			}
			testkit.EventuallyWithin(t, 10*time.Second, "the runner serves starts on the channel", c.Serving)
		})
	}
}

// TestRegisterFallsBackToNATS: a channel that fails (the node's end closed, or a node
// that never answers calls, within the register timeout of a start that is not
// patient) leaves the registration to NATS; a refusal on the channel is a refusal.
func TestRegisterFallsBackToNATS(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prepare func(c *localchan.Client, url string, got chan<- *localchan.Call)
		patient bool
		refused bool
	}{
		{"node end closed", func(c *localchan.Client, _ string, _ chan<- *localchan.Call) { c.Close() }, true, false},
		{"calls never served", func(*localchan.Client, string, chan<- *localchan.Call) {}, false, false},
		{"refused on the channel", func(c *localchan.Client, url string, got chan<- *localchan.Call) {
			localNode(c, url, "403", got)
		}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := testnats.Start(t, testnats.Options{NoJetStream: true})
			nc := testnats.Connect(t, srv)
			overNATS := make(chan protocol.RegisterAgentRequest, 1)
			fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, overNATS)
			c, s := localPair(t)
			tc.prepare(c, srv.ClientURL(), make(chan *localchan.Call, 1))
			opts := []Option{WithLocalChannel(s), WithLocalRegistration(), WithRegisterTimeout(300 * time.Millisecond)}
			if tc.patient {
				opts = append(opts, WithPatientStart())
			}
			r, err := NewRunner(context.Background(), node, newMemAgent(), opts...)
			if err != nil {
				t.Fatal(err)
			}
			err = r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}})
			if err == nil {
				t.Cleanup(func() { _ = r.Shutdown() })
			}
			if tc.refused {
				if err == nil || !strings.Contains(err.Error(), "refused") {
					t.Fatalf("Run = %v, want the channel's refusal", err)
				}
				if len(overNATS) != 0 {
					t.Fatal("a refused registration was tried over NATS too")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(overNATS) != 1 {
				t.Fatal("no registration over NATS after the channel failed")
			}
		})
	}
}

// TestRunWaitsForTheServerAfterRegistering: a patient start registered on the local
// channel whose node's NATS server is gone when the runner connects with the returned
// credentials (nexd re-executing just then stops its embedded server until the new
// image runs it) waits for the server to come back instead of failing. Before, Run
// failed with "no servers available" and the native nexlet exited 1 (seen as
// TestReexecKeepsDirLocks' "not adopted" under load).
func TestRunWaitsForTheServerAfterRegistering(t *testing.T) {
	port := testkit.StablePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	c, s := localPair(t)
	onChannel := make(chan *localchan.Call, 1)
	localNode(c, url, "", onChannel) // no server at url yet
	logs := &testkit.Buffer{}
	kp, _ := nkeys.CreateUser()
	r, err := NewRunner(t.Context(), node, newMemAgent(), WithLocalChannel(s), WithRegistrationKey(kp),
		WithPatientStart(), WithLocalRegistration(), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{url}}) }()
	// Not a wait for time to pass: the runner says it met no server, or Run ends.
	for !strings.Contains(logs.String(), "no NATS server reachable yet; retrying\" connection=nexlet-mem ") {
		select {
		case err := <-ran:
			t.Fatalf("Run ended before the server came back: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) { o.Port = port }})
	select {
	case err := <-ran:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return within 30 s of the server's start")
	}
	t.Cleanup(func() { _ = r.Shutdown() })
}
