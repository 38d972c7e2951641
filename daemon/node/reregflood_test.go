package node

import (
	"testing"
	"time"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackNexletReregistrationFloodBounded: a rogue nexlet that signs registers
// again and again under its own agent id, signed with its start's key, from the user
// its node minted for it on an operator-mode server, while the node has given it
// workloads. Each registration the node takes mints a nexlet user, revokes the older
// ones, and hands back every workload of the nexlet with a fresh user minted for it,
// which the minter keeps until the workload ends and then revokes, one rewrite of the
// account JWT each. Before, every registration was served: 100 registrations, 100
// more users for each of its 3 workloads (303 in all), each to be revoked at its end.
// Now a registration of a nexlet already registered in this node process counts
// against the same bound as its renewals of its own user (10 at once, 8 over its
// user's lifetime); the rest are dropped unanswered.
func TestAttackNexletReregistrationFloodBounded(t *testing.T) {
	rf := newRogueFixtureMinting(t, mint.Options{AgentTTL: time.Hour})
	n := rf.nodes[0]
	signed := signedStart(n, true)
	victim := rf.minted("agent0", "native-nexlet", "native", signed)
	rogue := rf.minted("rogue0", "rogue", "rogue", signed)
	wids := []string{rf.deployOnRogue(), rf.deployOnRogue(), rf.deployOnRogue()}
	users := func() int {
		total := 0
		for _, wid := range wids {
			total += len(rf.m.WorkloadUsers(wid))
		}
		return total
	}
	before := users()

	const registrations = 100
	body := mustJSON(t, rogue.req)
	answered := floodSigned(t, rogue, protocol.RegisterSubject(n.ID(), rogue.id), registrations, func(int) []byte { return body })
	if !testkit.WaitFor(2*time.Minute, func() bool { return answered.Load()+int64(n.AgentRenewalsDropped()) >= registrations }) {
		t.Fatalf("of %d registrations, %d answered and %d dropped within 2 minutes", registrations, answered.Load(), n.AgentRenewalsDropped())
	}
	grew := users() - before
	t.Logf("%d registrations of the rogue: %d answered, %d dropped; %d more users kept for its %d workloads", registrations, answered.Load(), n.AgentRenewalsDropped(), grew, len(wids))
	if most := len(wids) * agentRenewBurst; grew > most {
		t.Errorf("the rogue's %d registrations left %d more users of its %d workloads to revoke; want at most %d", registrations, grew, len(wids), most)
	}
	// The honest nexlet still renews its own user.
	rf.renewed(victim).Close()
}
