package node

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackReplylessRequests: anyone on the bus who may publish to the node's
// subjects sends 300 each of LAMEDUCK, AUCTION, WPING and INFO with no reply subject.
// Before, each was carried out (the node entered lame duck; every auction reserved a
// bid) and each answer's failure was a warning ("failed to send reply": 1,200 lines in
// the journal, as many as the attacker cares to send). Now none is carried out and
// the node warns once, counting them; a LAMEDUCK with a reply subject still works.
func TestAttackReplylessRequests(t *testing.T) {
	var logs testkit.Buffer
	f := newFixture(t, 1, func(_ int, o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	n := f.nodes[0]
	f.healthyAgent(n, "agent0", "native", "native", nil)
	attacker := testnats.Connect(t, f.srv)
	const each = 300
	for _, m := range []struct {
		subject string
		body    []byte
	}{
		{protocol.LameduckSubject(n.ID()), js(protocol.LameduckRequest{Delay: "1m"})},
		{protocol.AuctionSubject("system"), js(protocol.AuctionRequest{AgentType: "native", AuctionID: "a", Tags: map[string]string{}})},
		{protocol.WPingSubject("system"), js(protocol.AgentListWorkloadsRequest{Namespace: "system"})},
		{protocol.InfoSubject(n.ID()), js(protocol.NodeInfoRequest{"namespace": "system"})},
	} {
		for range each {
			if err := attacker.Publish(m.subject, m.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := attacker.Flush(); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "every reply-less request dropped", func() bool {
		return n.ReplylessDropped() == 4*each
	})
	if ld, _ := n.Lameduck(); ld {
		t.Error("a reply-less LAMEDUCK put the node in lame duck")
	}
	warns := strings.Count(logs.String(), "level=WARN")
	t.Logf("%d reply-less requests: %d warnings:\n%s", 4*each, warns, logs.String())
	if warns > 1 || !strings.Contains(logs.String(), "requests without a reply subject dropped") {
		t.Errorf("%d warnings for %d reply-less requests, want the one rate-limited warning", warns, 4*each)
	}

	// The same request with a reply subject is answered and carried out.
	var resp protocol.LameduckResponse
	if m := request(t, f.client, protocol.LameduckSubject(n.ID()), protocol.LameduckRequest{Delay: "1m"}); protocol.Decode(m.Data, &resp) != nil || !resp.Success {
		t.Fatalf("lameduck with a reply subject: %q", m.Data)
	}
	if ld, _ := n.Lameduck(); !ld {
		t.Error("a LAMEDUCK with a reply subject did not put the node in lame duck")
	}
}

// TestRateLog: the first warning goes out, the next ones within the interval are
// held back and counted, and the first after it says how many were.
func TestRateLog(t *testing.T) {
	var l rateLog
	t0 := time.Unix(1000, 0)
	if ok, held := l.allow(t0, time.Minute); !ok || held != 0 {
		t.Fatalf("first: %v, %d", ok, held)
	}
	for i := range 5 {
		if ok, _ := l.allow(t0.Add(time.Duration(i)*time.Second), time.Minute); ok {
			t.Fatalf("let through %d s after the first", i)
		}
	}
	if ok, held := l.allow(t0.Add(time.Minute), time.Minute); !ok || held != 5 {
		t.Fatalf("after the interval: %v, held %d, want 5", ok, held)
	}
}
