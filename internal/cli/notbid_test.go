package cli

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestNodeInfoShowsAuctionsNotBid: a real node on a real NATS server refuses auctions
// (tags that do not match, a type it has no nexlet of, a namespace too long), and
// `nexctl node info` says how many and why, the most frequent reason first; --json
// carries nexd_auctions_not_bid. Before, an operator whose node never won a placement
// could not tell why without debug logging.
// startRealNode starts a running node.Node made with o, to which it adds what o lacks:
// keys, a NoAuthMinter naming url, a MemStore, a silent logger; it stops at the test's end.
func startRealNode(t *testing.T, url string, o node.Options) *node.Node {
	t.Helper()
	var err error
	if o.NodeKey == nil {
		if o.NodeKey, err = nkeys.CreateServer(); err != nil {
			t.Fatal(err)
		}
	}
	if o.XKey, err = nkeys.CreateCurveKeys(); err != nil {
		t.Fatal(err)
	}
	o.Version, o.Minter, o.Store = "0.1.0", mint.NewNoAuthMinter(mint.Options{Servers: []string{url}}), node.NewMemStore()
	o.Logger, o.FanoutTimeout = slog.New(slog.DiscardHandler), time.Second
	if os.Getenv("NODE_TEST_LOG") != "" {
		o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	n, err := node.New(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		_ = n.Stop(ctx)
	})
	n.SetState(protocol.NodeRunning)
	return n
}

func TestNodeInfoShowsAuctionsNotBid(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	n := startRealNode(t, s.ClientURL(), node.Options{NC: testnats.Connect(t, s), Name: "lab", Nexus: "west",
		Tags: map[string]string{"zone": "a"}})

	nc := testnats.Connect(t, s)
	auction := func(ns string, req protocol.AuctionRequest) {
		t.Helper()
		req.AuctionID = "a1"
		body, err := protocol.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.PublishRequest(protocol.AuctionSubject(ns), nc.NewRespInbox(), body); err != nil {
			t.Fatal(err)
		}
	}
	auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "b"}})
	auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{"zone": "c"}})
	auction("tenant", protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{}})
	auction(strings.Repeat("n", protocol.MaxNamespaceLen+1), protocol.AuctionRequest{AgentType: "native", Tags: map[string]string{}})
	testkit.Eventually(t, "4 auctions counted", func() bool {
		total := uint64(0)
		for _, c := range n.NotBid() {
			total += c
		}
		return total == 4
	})

	out, errOut, code := runCLI(t, nil, natsArgs(s.ClientURL(), "node", "info", n.ID())...)
	want := "Not bid on │ 4 auction(s) since start: 2 tags do not match, 1 invalid namespace, 1 no healthy nexlet of the type"
	if code != 0 || !strings.Contains(out, want) {
		t.Fatalf("node info: exit %d, want a line %q:\n%s%s", code, want, out, errOut)
	}
	out, errOut, code = runCLI(t, nil, natsArgs(s.ClientURL(), "--json", "node", "info", n.ID())...)
	if code != 0 || !strings.Contains(out, `"tags": 2`) || !strings.Contains(out, `"draining": 0`) {
		t.Fatalf("node info --json: exit %d, want nexd_auctions_not_bid:\n%s%s", code, out, errOut)
	}
}
