package node

import (
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// tenantFeed subscribes the client to every feed of namespace tenant, flushed.
func (rf *rogueFixture) tenantFeed() *nats.Subscription {
	rf.t.Helper()
	feed, err := rf.client.SubscribeSync(protocol.FeedWildcard("tenant", ""))
	if err != nil {
		rf.t.Fatal(err)
	}
	if err := rf.client.Flush(); err != nil {
		rf.t.Fatal(err)
	}
	return feed
}

// directForgeries publishes, from nc straight on $NEX.FEED (as upstream's SDK does), a
// log line, a metrics sample and a WORKLOADSTARTED event about workload wid in
// namespace tenant, and returns what a subscriber of the tenant's feeds got of them.
func (rf *rogueFixture) directForgeries(nc *nats.Conn, wid string) []string {
	rf.t.Helper()
	feed := rf.tenantFeed()
	defer func() { _ = feed.Unsubscribe() }()
	for _, m := range []struct {
		subj string
		data []byte
	}{
		{protocol.LogSubject("tenant", wid, "stdout"), []byte("forged line")},
		{protocol.MetricsSubject("tenant", wid), []byte(`{"forged":1}`)},
		{protocol.EventSubject("tenant", protocol.EventWorkloadStarted), js(protocol.WorkloadStartedEvent{ID: wid, Namespace: "tenant"})},
	} {
		if err := nc.Publish(m.subj, m.data); err != nil {
			rf.t.Fatal(err)
		}
	}
	_ = nc.Flush()
	var got []string
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		m, err := feed.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		got = append(got, m.Subject)
	}
	slices.Sort(got)
	return got
}

// TestRogueUpstreamNexletForgesFeeds: a rogue nexlet on upstream's SDK (unsigned, so it
// cannot relay) publishes a log line, a metrics sample and an event about another
// nexlet's workload, in that workload's namespace, straight on $NEX.FEED. By default
// none reaches the tenant's subscribers (its user has no $NEX.FEED grant) and the node
// warns once, naming allow_nexlet_direct_feeds, also when the nexlet registers again.
// With the key set, all three arrive: upstream's SDK publishes there. Before, the
// unsigned nexlet always had the grant and all three arrived.
func TestRogueUpstreamNexletForgesFeeds(t *testing.T) {
	for _, allow := range []bool{false, true} {
		t.Run(map[bool]string{false: "default", true: "allow_nexlet_direct_feeds"}[allow], func(t *testing.T) {
			var logs testkit.Buffer
			rf := newRogueFixture(t, func(o *Options) {
				o.AllowDirectFeeds = allow
				o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			})
			n := rf.nodes[0]
			rf.minted("agent0", "native-nexlet", "native", signedStart(n, true))
			rogue := rf.minted("plain0", "plain", "plain", nil) // no key: unsigned_registration
			if rogue.resp.NexdFeedRelay {
				t.Error("the unsigned nexlet was told to relay, which upstream's SDK cannot")
			}
			wid := rf.deployOne("tenant")
			got := rf.directForgeries(rogue.nc, wid)
			want := []string{protocol.EventSubject("tenant", protocol.EventWorkloadStarted),
				protocol.LogSubject("tenant", wid, "stdout"), protocol.MetricsSubject("tenant", wid)}
			if !allow {
				want = nil
			}
			if !slices.Equal(got, want) {
				t.Errorf("the tenant's feeds carried %q of the unsigned nexlet's direct messages, want %q", got, want)
			}
			rf.minted(rogue.id, "plain", "plain", nil) // the same nexlet registers again (restarted)
			if c := strings.Count(logs.String(), "set allow_nexlet_direct_feeds"); c != map[bool]int{false: 1, true: 0}[allow] {
				t.Errorf("warned %d times naming allow_nexlet_direct_feeds over two registrations of the nexlet\n%s", c, logs.String())
			}
		})
	}
}

// TestOlderLocalNexletRefusedDirectFeeds: a supervised local nexlet, signed with its
// start's key, registers without nexd_feed_relay, as a nexlet older than the relay
// would (or a rogue claiming to be one). By default it gets no direct grant: its log
// line, metrics and event about another nexlet's workload are refused by the server,
// with its registration's user and after renewal. Before, it kept the direct grant on
// every namespace's feeds (TestOlderSupervisedNexletKeepsDirectFeeds: now only with
// allow_nexlet_direct_feeds).
func TestOlderLocalNexletRefusedDirectFeeds(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	rf.minted("agent0", "native-nexlet", "native", signedStart(n, true))
	old := rf.minted("old0", "old", "old", signedStart(n, false))
	if old.resp.NexdFeedRelay {
		t.Error("the older nexlet was told to relay, which its SDK does not know")
	}
	wid := rf.deployOne("tenant")
	if got := rf.directForgeries(old.nc, wid); len(got) != 0 {
		t.Errorf("the older nexlet's direct feed messages reached the tenant: %q", got)
	}
	if got := rf.directForgeries(rf.renewed(old), wid); len(got) != 0 {
		t.Errorf("after renewal, the older nexlet's direct feed messages reached the tenant: %q", got)
	}
}

// TestOlderNexletStopReachesFeed: an older supervised nexlet refused the direct grant
// cannot put its workload's WORKLOADSTOPPED on the feed; it reports the end
// (WORKLOADENDED), and the node publishes the event from the report, once, as it does
// for a relaying nexlet. Before, the node left that to the nexlet's direct event, which
// the server now refuses: subscribers never heard of the end.
func TestOlderNexletStopReachesFeed(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	old := rf.minted("native0", "native-nexlet", "native", signedStart(n, false))
	wid := rf.deployOne("tenant")
	feed, err := rf.client.SubscribeSync(protocol.EventSubject("tenant", protocol.EventWorkloadStopped))
	if err != nil {
		t.Fatal(err)
	}
	if err := rf.client.Flush(); err != nil {
		t.Fatal(err)
	}
	stopped := js(protocol.WorkloadStoppedEvent{ID: wid, Namespace: "tenant", WorkloadType: "native"})
	if err := old.nc.Publish(protocol.EventSubject("tenant", protocol.EventWorkloadStopped), stopped); err != nil {
		t.Fatal(err) // refused by the server: no grant
	}
	for range 2 { // a retry, its acknowledgement lost
		m := request(t, old.nc, protocol.WorkloadEndedSubject(n.ID(), old.id, wid), stopped)
		if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
			t.Fatalf("ended report refused: %s %s", code, m.Header.Get(protocol.HeaderError))
		}
	}
	if got := feedBodies(feed); !slices.Equal(got, []string{string(stopped)}) {
		t.Errorf("the tenant's WORKLOADSTOPPED feed carried %q, want the reported end once", got)
	}
}
