package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
)

// TestBidRightAfterReady: a client that auctions once the moment nexd says READY=1 (as
// upstream's client does: one auction, then it gives up) gets the native nexlet's bid.
// Before, READY followed the nexlet's registration, and its health stayed unknown
// (no bid) until its first heartbeat, sent once it served on its own connection a
// few milliseconds to 0.1 s later: 3 of 4 rounds' auctions went unanswered at load 0.6,
// 12 of 12 at load 25-30. Each round is a fresh nexd on a NATS server of its own.
func TestBidRightAfterReady(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const rounds = 4
	for i := range rounds {
		s := testnats.Start(t, testnats.Options{})
		nc := testnats.Connect(t, s)
		ns := newNotifySocket(t)
		n := startNode(t, nodeOpts{external: s.ClientURL(), notify: ns})
		ready := ns.waitFor(t, "READY=1", 60*time.Second)
		// Exactly one auction, at once, as upstream's client sends it.
		body := fmt.Sprintf(`{"agent_type":"native","auction_id":"ready-%d","tags":{}}`, i)
		m, err := nc.Request("$NEX.SVC.system.control.AUCTION", []byte(body), 2*time.Second)
		switch {
		case errors.Is(err, nats.ErrTimeout):
			t.Errorf("round %d: no bid for an auction sent right after READY=1 (%q)", i, ready)
		case err != nil:
			t.Fatalf("round %d: auction: %v", i, err)
		default:
			var bid map[string]any
			if err := json.Unmarshal(m.Data, &bid); err != nil || bid["bidder_id"] == nil {
				t.Errorf("round %d: auction answered %q, want a bid", i, m.Data)
			}
		}
		if !strings.Contains(ready, "1 nexlets") || strings.Contains(ready, "not ") {
			t.Errorf("round %d: READY=1 %q, want the native nexlet registered and serving", i, ready)
		}
		n.signal(t, syscall.SIGTERM)
		if code := n.wait(t, 60*time.Second); code != 0 {
			t.Fatalf("round %d: nexd exited %d after SIGTERM", i, code)
		}
		nc.Close()
	}
}
