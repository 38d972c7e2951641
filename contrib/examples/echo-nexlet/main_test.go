package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestRemoteRegistrationAndJob plays a node that allows remote registration and checks
// that the example registers, runs a job to completion and reports it.
func TestRemoteRegistrationAndJob(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	registered := make(chan protocol.RegisterAgentRequest, 1)
	_, _ = nc.QueueSubscribe(protocol.RemoteRegisterSubject("nexus"), "nexus", func(m *nats.Msg) {
		b, _ := json.Marshal(protocol.RegisterRemoteAgentResponse{AssignedAgentID: "ECHO1", RespondTo: "NODE1"})
		_ = m.Respond(b)
	})
	_, _ = nc.Subscribe(protocol.RegisterSubject("NODE1", "ECHO1"), func(m *nats.Msg) {
		var req protocol.RegisterAgentRequest
		if err := protocol.Decode(m.Data, &req); err != nil {
			t.Errorf("register: %v", err)
		}
		registered <- req
		b, _ := json.Marshal(protocol.RegisterAgentResponse{Success: true, NodeID: "NODE1",
			ConnectionData: protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}})
		_ = m.Respond(b)
	})
	logs, _ := nc.SubscribeSync(protocol.LogSubject("ns", "W1", "stdout"))
	stopped, _ := nc.SubscribeSync(protocol.EventSubject("ns", protocol.EventWorkloadStopped))
	_ = nc.Flush()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, slog.New(slog.DiscardHandler), "echo", "nexus", srv.ClientURL(), "") }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case reg := <-registered:
		if reg.RegisterType != "echo" || !strings.Contains(reg.StartRequestSchema, "EchoStartRequest") {
			t.Errorf("registration = %+v", reg)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no registration")
	}
	start, _ := json.Marshal(protocol.AgentStartWorkloadRequest{Request: protocol.StartWorkloadRequest{Name: "hi", Namespace: "ns",
		RunRequest: `{"message":"hello","interval":"10ms","count":2}`, Tags: map[string]string{},
		WorkloadLifecycle: protocol.LifecycleJob, WorkloadType: "echo"}})
	var m *nats.Msg
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		// The endpoints are up once Run returns: until then the request finds no
		// responder. Only that is retried: a start that was delivered but answered
		// late (under load) and sent again would be refused as already running.
		m, err = nc.Request(protocol.StartWorkloadSubject("NODE1", "ECHO1", "W1"), start, 30*time.Second)
		if !errors.Is(err, nats.ErrNoResponders) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil || m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("start: %v %v", err, m)
	}
	for range 2 {
		if lm, err := logs.NextMsg(30 * time.Second); err != nil || string(lm.Data) != "hello" {
			t.Fatalf("log: %v %v", lm, err)
		}
	}
	if _, err := stopped.NextMsg(30 * time.Second); err != nil {
		t.Fatalf("no WORKLOADSTOPPED: %v", err)
	}
}
