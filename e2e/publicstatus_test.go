package e2e

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestAttackPublicStatusShowsNoWorkloads: a local user outside group nex asks the
// node's status (control_allow_others = status) on a node with a tombstone: a tenant's
// workload stopped while the state store was down. Before, the public answer listed
// the tombstone (workload id, type and the tenant's namespace) and the nexlets' pids,
// last exits and agent ids; now it has counts and the node's health only, marked
// public. Root (an admin) still sees everything.
func TestAttackPublicStatusShowsNoWorkloads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	testkit.RequireUsers(t)
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), publicSocket: true, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	const ns = "tenant-hidden"
	w := n.runWorkload(t, "--namespace", ns, "--name", "secret-app", "--", "/bin/sleep", "600")
	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	if out := n.mustCtl(t, "--namespace", ns, "workload", "stop", w.ID); !strings.Contains(out, "tombstone") {
		t.Fatalf("the stop left no tombstone: %s", out)
	}
	full := n.waitReady(t)
	if len(full.Tombstones) != 1 || full.Tombstones[0].Namespace != ns || full.TombstoneCount != 1 || full.Public {
		t.Fatalf("root's status: tombstones %+v (count %d, public %v), want the stopped workload's", full.Tombstones, full.TombstoneCount, full.Public)
	}

	mallory := testkit.NewUser(t)
	cmd := mallory.Command(nexctlBin(t), "--control-socket", n.socket, "--json", "status")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nexctl status as %s: %v\n%s", mallory.Name, err, out)
	}
	for _, secret := range []string{w.ID, ns, "secret-app", full.Nexlets[0].AgentID, `"last_exit"`, "workload_users", `"bucket": "nex-`} {
		if strings.Contains(string(out), secret) {
			t.Errorf("the public status shows %q:\n%s", secret, out)
		}
	}
	var pub control.Status
	if err := json.Unmarshal(out, &pub); err != nil {
		t.Fatalf("nexctl status --json as %s: %v\n%s", mallory.Name, err, out)
	}
	for _, x := range pub.Nexlets {
		if x.PID != 0 || x.MemoryBytes != 0 || x.AgentID != "" {
			t.Errorf("the public status shows a nexlet's pid, memory or agent id: %+v", x)
		}
	}
	if !pub.Public || pub.TombstoneCount != 1 || pub.NodeID != full.NodeID || pub.State != control.StateRunning ||
		len(pub.Nexlets) != len(full.Nexlets) || pub.Nexlets[0].Health != full.Nexlets[0].Health {
		t.Errorf("the public status lacks the counts and health: %s", out)
	}
	// nexctl's table says it is the public view.
	cmd = mallory.Command(nexctlBin(t), "--control-socket", n.socket, "status")
	if out, err := cmd.Output(); err != nil || !strings.Contains(string(out), "group nex") || strings.Contains(string(out), w.ID) {
		t.Errorf("nexctl status as %s: %v\n%s", mallory.Name, err, out)
	}
}
