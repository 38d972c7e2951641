package node

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// idleNexlet is a nexd SDK nexlet that holds nothing: what a runner needs to register.
type idleNexlet struct{ id, name, typ string }

func (a idleNexlet) Register() (*protocol.RegisterAgentRequest, error) {
	return &protocol.RegisterAgentRequest{Name: a.name, RegisterType: a.typ, Description: "idle", Version: "1.0.0",
		StartRequestSchema: testSchema, SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleService}}, nil
}
func (a idleNexlet) Heartbeat() (*protocol.AgentHeartbeat, error) {
	s, _ := a.Ping()
	return &protocol.AgentHeartbeat{Data: "{}", Summary: *s}, nil
}
func (idleNexlet) StartWorkload(string, *protocol.AgentStartWorkloadRequest, bool) (*protocol.StartWorkloadResponse, error) {
	return nil, errors.New("idle")
}
func (idleNexlet) StopWorkload(string, *protocol.StopWorkloadRequest) error {
	return errors.New(protocol.ErrTextWorkloadNotFound)
}
func (idleNexlet) GetWorkload(string, string) (*protocol.StartWorkloadRequest, error) {
	return nil, errors.New(protocol.ErrTextWorkloadNotFound)
}
func (idleNexlet) QueryWorkloads(string, []string) ([]protocol.WorkloadSummary, error) {
	return []protocol.WorkloadSummary{}, nil
}
func (idleNexlet) SetLameduck(time.Duration) error { return nil }
func (a idleNexlet) Ping() (*protocol.AgentSummary, error) {
	return &protocol.AgentSummary{Name: a.name, Type: a.typ, State: "running", SupportedLifecycles: "service", Version: "1.0.0"}, nil
}

// countingUnreadableStore is typeUnreadableStore counting the reads it failed.
type countingUnreadableStore struct {
	typeUnreadableStore
	failed *atomic.Int64
}

func (c countingUnreadableStore) ByType(ctx context.Context, typ string) (map[string]protocol.StartWorkloadRequest, error) {
	m, err := c.typeUnreadableStore.ByType(ctx, typ)
	if err != nil {
		c.failed.Add(1)
	}
	return m, err
}

// TestAdoptedNexletRegistersAgainOnSocketAfterRefusal (fault: node state unreadable
// while a new nexd adopts a running nexlet): a nexd SDK runner registered over NATS is
// told to register again (Reregister) as an adopted nexlet is, with the adopting node's
// socket named (WithLocalSocket): a real Unix socket whose connections the node takes
// as the adopted nexlet's channel (SetAdoptedLocal), as the nexlets manager does. The
// node refuses its registrations there 503 (state unreadable) until the state reads
// again; the runner asks again on the socket, is served there, and the node's
// registration holds the channel (its starts go there). Before, the first refusal on
// the socket sent the nexlet over NATS for good: refused there alike until the state
// read, then registered over NATS, its starts and feeds there for the rest of its run.
func TestAdoptedNexletRegistersAgainOnSocketAfterRefusal(t *testing.T) {
	down, refused := new(atomic.Bool), new(atomic.Int64)
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Store = countingUnreadableStore{typeUnreadableStore{MemStore: NewMemStore(), down: down}, refused}
	})
	n := f.nodes[0]
	const id = "agentA"
	n.ExpectAgent(id, "idle")
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	n.SetAgentKey(id, pub)

	// The adopting nexd's socket: each connection is the adopted nexlet's channel.
	sock := filepath.Join(t.TempDir(), "nexlets.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			file, err := c.File()
			c.Close()
			if err != nil {
				t.Error(err)
				return
			}
			cl, err := localchan.NewClient(file)
			if err != nil {
				t.Error(err)
				return
			}
			t.Cleanup(func() { _ = cl.Close() })
			n.SetAdoptedLocal(id, pub, cl)
		}
	}()
	t.Cleanup(func() { ln.Close(); <-accepted })

	r, err := nexlet.NewRunner(t.Context(), n.ID(), idleNexlet{id: id, name: "idle", typ: "idle"},
		nexlet.WithRegistrationKey(kp), nexlet.WithLocalSocket(sock), nexlet.WithHeartbeatInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(id, protocol.NatsConnectionData{NatsServers: []string{f.srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	waitHealthy(t, n, id)

	// Registrations over NATS from here on are counted (an open server: the test's
	// client sees them).
	var overNATS atomic.Int64
	sub, err := f.client.Subscribe(protocol.RegisterSubject(n.ID(), id), func(*nats.Msg) { overNATS.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := f.client.Flush(); err != nil {
		t.Fatal(err)
	}

	down.Store(true)
	done := make(chan error, 1)
	go func() { done <- r.Reregister() }()
	const refusals = 3
	testkit.EventuallyWithin(t, time.Minute, "registrations again refused while node state is unreadable", func() bool { return refused.Load() >= refusals })
	down.Store(false)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("register again: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("registering again did not end within a minute of node state reading again")
	}
	n.mu.Lock()
	reg := n.agents[id]
	onChannel := reg != nil && reg.local != nil
	n.mu.Unlock()
	t.Logf("registrations again refused 503: %d; over NATS: %d; registered on the socket's channel: %v", refused.Load(), overNATS.Load(), onChannel)
	if k := overNATS.Load(); k > 0 {
		t.Errorf("the adopted nexlet registered over NATS %d times after its refusal on the node's socket; want it asked again on the socket", k)
	}
	if !onChannel {
		t.Errorf("the adopted nexlet's registration does not hold its channel on the node's socket: its starts go over NATS")
	}
}
