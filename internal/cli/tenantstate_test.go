package cli

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestTenantNodeStateRefused: `nexctl node state` and `node state prune` read the
// nodes' KV state through JetStream, `workload logs --tail` of a workload not on this
// host the log stream; run with a tenant's user (mint.TenantPermissions
// on an operator-mode server, its inbox prefix set) they fail at once with the
// server's refusal (publish to $JS.API...) and the grant they need. Before, the
// JetStream request heard nothing and the command waited out its context (here the
// test's 2 min; the JetStream API's 5 s without a deadline) and said "context
// deadline exceeded". The admin's user reads the same bucket.
func TestTenantNodeStateRefused(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	nodeID, _ := testnats.NewStateBucket(t, op.Connect(t, "nexd"), testnats.Record{Key: "native.W1", Value: []byte(`{}`)})
	dir := t.TempDir()
	p, err := mint.TenantPermissions("shop")
	if err != nil {
		t.Fatal(err)
	}
	tenant := userContext(t, op, dir, "tenant", p, protocol.TenantInboxPrefix("shop"))
	admin := userContext(t, op, dir, "admin", jwt.Permissions{}, "")
	nexctl := func(ctxFile string, args ...string) (string, string, int) {
		return runCLI(t, nil, append([]string{"--control-socket", filepath.Join(dir, "none.sock"), "--nats.context", ctxFile,
			"--namespace", "shop", "--nats.timeout", "2s"}, args...)...)
	}

	out, errOut, code := nexctl(admin, "--json", "node", "state", nodeID)
	var entries []stateEntry
	if code != 0 || json.Unmarshal([]byte(out), &entries) != nil || len(entries) != 1 || entries[0].Key != "native.W1" {
		t.Fatalf("the admin's node state: exit %d %q %q", code, out, errOut)
	}
	for _, args := range [][]string{{"node", "state", nodeID}, {"node", "state", "prune", "--dry-run"},
		{"workload", "logs", "0123456789abcdefABCDEF", "--tail", "5"}} {
		start := time.Now()
		out, errOut, code = nexctl(tenant, args...)
		took := time.Since(start)
		t.Logf("tenant: nexctl %s: exit %d after %v: %s", strings.Join(args, " "), code, took.Round(time.Millisecond), strings.TrimSpace(errOut))
		for _, want := range []string{"Permissions Violation for Publish to \"$JS.API.", "it needs publish on $JS.API.>", "a node admin's credentials"} {
			if !strings.Contains(errOut, want) {
				t.Errorf("tenant: nexctl %s: exit %d, stderr %q lacks %q (stdout %q)", strings.Join(args, " "), code, errOut, want, out)
			}
		}
		if code != ExitFailed || strings.Contains(errOut, "deadline exceeded") {
			t.Errorf("tenant: nexctl %s: exit %d, %q: want the refusal, exit %d", strings.Join(args, " "), code, errOut, ExitFailed)
		}
	}
}
