package node

import (
	"context"
	"slices"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// TestRogueNexletFloodsItsReplies: a rogue nexlet answers each list it is asked on its
// own subject a thousand times (its minted user's response permission allows that
// many). The honest nexlet's answer still counts in every list. Before, the replies
// shared one channel of a few slots: it filled, the NATS client dropped what came next
// (slow consumer), and the honest nexlet was named missing (3 of 10 lists); a stop
// confirmation lost so leaves a stopped workload in node state.
func TestRogueNexletFloodsItsReplies(t *testing.T) {
	rf := newRogueFixture(t)
	victim := rf.minted("agent0", "native-nexlet", "native", nil)
	rogue := rf.minted("rogue0", "rogue", "rogue", nil)
	rf.deployOne("tenant")
	rogue.mute.Store(true)
	p := protocol.AgentPrefix(rogue.nodeID)
	if _, err := rogue.nc.Subscribe(p+"."+rogue.id+".QUERYWORKLOADS", func(m *nats.Msg) {
		for range 1000 {
			_ = m.Respond([]byte("[]"))
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := rogue.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		out, missing, err := rf.nodes[0].queryWorkloads(context.Background(), protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace})
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(missing, func(m protocol.MissingNexlet) bool { return m.ID == victim.id }) || len(out) != 1 {
			t.Errorf("list %d: %d rows, missing %+v: the honest nexlet's answer was lost", i, len(out), missing)
		}
	}
}
