package daemon

import (
	"context"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/identity"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestCheckStateReplicas: --check says how many state bucket replicas nexd asks for
// and how many the node's bucket has, and refuses a count the zero-config embedded
// server cannot give.
func TestCheckStateReplicas(t *testing.T) {
	ctx := context.Background()
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	id, err := identity.Load("", "", dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &config.Config{}
	cfg.Node.State, cfg.Node.StateDir = "kv", dir
	cfg.NATS.Servers = []string{s.ClientURL()}
	check := func(want ...string) {
		t.Helper()
		lines, problem := checkStateReplicas(ctx, cfg)
		text := strings.Join(lines, "\n")
		if problem != nil {
			t.Fatalf("problem: %v\n%s", problem, text)
		}
		for _, w := range want {
			if !strings.Contains(text, w) {
				t.Errorf("--check says\n%s\nwant %q", text, w)
			}
		}
	}
	check("asks for 1 replicas (state_replicas 0 (auto): the NATS server is not clustered)", "does not exist yet: start creates it with 1")
	nc := testnats.Connect(t, s)
	if _, err := state.OpenReplicatedKV(ctx, nc, id.ID(), "", 1, nil); err != nil {
		t.Fatal(err)
	}
	check(state.BucketName(id.ID()) + " has 1 replicas")
	cfg.Node.StateReplicas = 3
	check("asks for 3 replicas (state_replicas 3)", "looks too small for 3 replicas", "has 1 replicas, fewer than 3: start scales it up, or fails")

	cfg.NATS.Servers = nil
	if _, problem := checkStateReplicas(ctx, cfg); problem == nil || !strings.Contains(problem.Error(), "embedded server is one server") {
		t.Fatalf("state_replicas 3 with the zero-config embedded server: %v", problem)
	}
}

// TestNodeConnectionInboxPrefix: the node's connection names its inboxes under
// protocol.NodeInboxRoot, a fresh token each (daemon/node
// TestAttackNexletForgesIntoNodeWatcher shows why).
func TestNodeConnectionInboxPrefix(t *testing.T) {
	a, _ := natsOptions(&config.Config{})
	b, _ := natsOptions(&config.Config{})
	if !strings.HasPrefix(a.InboxPrefix, protocol.NodeInboxRoot+".") || a.InboxPrefix == b.InboxPrefix {
		t.Errorf("inbox prefixes %q and %q, want distinct ones under %s", a.InboxPrefix, b.InboxPrefix, protocol.NodeInboxRoot)
	}
}
