package e2e

import (
	"regexp"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestReplylessRequestsCounted: requests to a real node without a reply subject (5
// INFO, 2 auctions), which anyone on the bus may send, are counted in its metrics,
// nexd_requests_replyless_dropped_total 7; before, only the warning at most once a
// minute told of them.
func TestReplylessRequestsCounted(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	st := n.waitReady(t)
	nc := testnats.Connect(t, s)
	for range 5 {
		if err := nc.Publish(protocol.InfoSubject(st.NodeID), []byte(`{"namespace":"system"}`)); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if err := nc.Publish(protocol.AuctionSubject("default"), []byte(`{"agent_type":"native","auction_id":"a","tags":{}}`)); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	counted := regexp.MustCompile(`(?m)^nexd_requests_replyless_dropped_total 7$`)
	testkit.Eventually(t, "nexd_requests_replyless_dropped_total 7 in nexctl metrics", func() bool {
		return counted.MatchString(n.mustCtl(t, "metrics"))
	})
}
