package nexlet

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// feedNode is a node's end that takes feed batches on the channel, recording their
// bodies in order.
type feedNode struct {
	mu    sync.Mutex
	got   []string
	fail  bool // refuse batches
	failN int  // refuse the next failN batches
}

func (f *feedNode) take(batch []*nats.Msg) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail || f.failN > 0 {
		f.failN--
		return fmt.Errorf("refused")
	}
	for _, m := range batch {
		f.got = append(f.got, m.Subject+" "+string(m.Data))
	}
	return nil
}

func (f *feedNode) lines() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.got...)
}

// feedRunner is a runner registered on its local channel, its feeds going there; the
// node's end c and the NATS connection of the test are returned.
func feedRunner(t *testing.T) (*Runner, *localchan.Client, *feedNode, *nats.Conn) {
	t.Helper()
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	fakeNode(t, nc, srv.ClientURL(), &protocol.RegisterAgentResponse{Success: true, NodeID: node}, make(chan protocol.RegisterAgentRequest, 8))
	c, s := localPair(t)
	localNode(c, srv.ClientURL(), "", make(chan *localchan.Call, 8))
	fn := &feedNode{}
	c.OnFeed(fn.take, nil)
	r, err := NewRunner(context.Background(), node, newMemAgent(), WithLocalChannel(s), WithLocalRegistration(), WithLocalFeeds(),
		WithHeartbeatInterval(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(agent, protocol.NatsConnectionData{NatsServers: []string{srv.ClientURL()}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown() })
	return r, c, fn, nc
}

func writeLines(t *testing.T, w interface{ Write([]byte) (int, error) }, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if _, err := w.Write([]byte(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFeedsHeldWhileNodeGone: a runner's log lines go on its local channel, in order;
// once the node's end closed (nexd exited) they are kept, not published, and once the
// nexlet registered again (with the next nexd, over NATS) they go out there, in order,
// before the lines written after. Before, they were published at once on a relay
// subject nobody subscribed to while nexd was down: lost.
func TestFeedsHeldWhileNodeGone(t *testing.T) {
	r, c, fn, nc := feedRunner(t)
	subj := protocol.LogSubject("ns", "W1", "stdout")
	sub, err := nc.SubscribeSync(subj)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	w := r.Logger("W1", "ns", "stdout")
	writeLines(t, w, 0, 100)
	testkit.EventuallyWithin(t, 10*time.Second, "100 lines on the channel", func() bool { return len(fn.lines()) == 100 })
	for i, l := range fn.lines() {
		if l != subj+" "+strconv.Itoa(i) {
			t.Fatalf("line %d on the channel is %q", i, l)
		}
	}
	// The node's end took them; the runner forgets them only on the acknowledgement,
	// which may still be on its way (a close before it keeps them: 186 were kept).
	testkit.EventuallyWithin(t, 10*time.Second, "the 100 lines acknowledged", func() bool { return r.feedCount() == 0 })
	_ = c.Close() // nexd exits
	testkit.EventuallyWithin(t, 10*time.Second, "the runner saw the channel close", func() bool {
		select {
		case <-r.localDone:
			return true
		default:
			return false
		}
	})
	writeLines(t, w, 100, 200)
	if n := r.feedCount(); n != 100 {
		t.Fatalf("%d lines kept while no node takes them, want 100", n)
	}
	if m, err := sub.NextMsg(300 * time.Millisecond); err == nil {
		t.Fatalf("a line published while no node took them: %q", m.Data)
	}
	if err := r.Reregister(); err != nil {
		t.Fatal(err)
	}
	writeLines(t, w, 200, 250)
	for i := 100; i < 250; i++ {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if string(m.Data) != strconv.Itoa(i) {
			t.Fatalf("got line %q, want %d", m.Data, i)
		}
		if m.Header.Get(FeedHeader(protocol.HeaderNamespace)) != "ns" {
			t.Fatalf("line %d lost its headers: %v", i, m.Header)
		}
	}
}

// TestFeedBufferDropsOldest: while no node takes them, the kept lines are bounded
// (FeedBufferMessages); the oldest go first, and the first line sent after says how
// many of its subject were dropped (HeaderFeedDropped).
func TestFeedBufferDropsOldest(t *testing.T) {
	r, c, _, nc := feedRunner(t)
	subj := protocol.LogSubject("ns", "W1", "stdout")
	sub, err := nc.SubscribeSync(subj)
	if err != nil {
		t.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	_ = nc.Flush()
	_ = c.Close()
	<-r.localDone
	w := r.Logger("W1", "ns", "stdout")
	const over = 7
	writeLines(t, w, 0, FeedBufferMessages+over)
	if n := r.feedCount(); n != FeedBufferMessages {
		t.Fatalf("%d lines kept, want %d", n, FeedBufferMessages)
	}
	if err := r.Reregister(); err != nil {
		t.Fatal(err)
	}
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if string(m.Data) != strconv.Itoa(over) || m.Header.Get(HeaderFeedDropped) != strconv.Itoa(over) {
		t.Fatalf("first line after the drop %q with %s %q, want %d with %d", m.Data, HeaderFeedDropped, m.Header.Get(HeaderFeedDropped), over, over)
	}
	for i := over + 1; i < FeedBufferMessages+over; i++ {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if string(m.Data) != strconv.Itoa(i) || m.Header.Get(HeaderFeedDropped) != "" {
			t.Fatalf("got line %q (%v), want %d", m.Data, m.Header, i)
		}
	}
}

// TestRefusedFeedBatchSentAgain: a batch the node does not take (its NATS connection
// is down) is kept and sent again, the lines in order and none twice.
func TestRefusedFeedBatchSentAgain(t *testing.T) {
	r, _, fn, _ := feedRunner(t)
	fn.mu.Lock()
	fn.fail = true
	fn.mu.Unlock()
	w := r.Logger("W1", "ns", "stdout")
	writeLines(t, w, 0, 10)
	time.Sleep(3 * feedRetry)
	fn.mu.Lock()
	fn.fail = false
	fn.mu.Unlock()
	writeLines(t, w, 10, 20)
	testkit.EventuallyWithin(t, 10*time.Second, "20 lines on the channel", func() bool { return len(fn.lines()) >= 20 })
	wantLines(t, fn.lines(), 20)
}

// TestRefusedFeedBatchKeepsOrder: the node refuses one batch while later ones are on
// their way (the nexlet keeps up to localchan.MaxFeedBatches unacknowledged): those are
// refused too and sent again after it, so the lines reach the node in order, none
// twice. Before, the node took the later batches, and the nexlet sent them again
// behind the refused one: the lines came out of order, and twice.
func TestRefusedFeedBatchKeepsOrder(t *testing.T) {
	r, _, fn, _ := feedRunner(t)
	fn.mu.Lock()
	fn.failN = 1
	fn.mu.Unlock()
	w := r.Logger("W1", "ns", "stdout")
	writeLines(t, w, 0, 40)
	testkit.EventuallyWithin(t, 10*time.Second, "40 lines on the channel", func() bool { return len(fn.lines()) >= 40 })
	time.Sleep(3 * feedRetry) // what a wrong re-send would add
	wantLines(t, fn.lines(), 40)
}

// wantLines checks that got is W1's stdout lines 0 to n-1, in order, each once.
func wantLines(t *testing.T, got []string, n int) {
	t.Helper()
	if len(got) != n {
		t.Fatalf("%d lines, want %d: %q", len(got), n, got)
	}
	for i, l := range got {
		if l != protocol.LogSubject("ns", "W1", "stdout")+" "+strconv.Itoa(i) {
			t.Fatalf("line %d is %q", i, l)
		}
	}
}

// TestFeedsGoOverNATSWhenChannelBreaksUnderALiveNode: the channel closes while the
// process that spawned the nexlet still runs (it stopped reading; no new nexd will
// adopt the nexlet and have it register again): the kept lines go over NATS once the
// wait for a re-registration is over (feedHeldMax, shortened here), in order, and so
// do the later ones.
func TestFeedsGoOverNATSWhenChannelBreaksUnderALiveNode(t *testing.T) {
	r, c, _, nc := feedRunner(t)
	sub := breakChannel(t, r, c, nc, procid.ID{})
	w := r.Logger("W1", "ns", "stdout")
	writeLines(t, w, 0, 10)
	if m, err := sub.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("a line published at once: %q", m.Data)
	}
	for i := range 10 {
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if string(m.Data) != strconv.Itoa(i) {
			t.Fatalf("got line %q, want %d", m.Data, i)
		}
	}
	writeLines(t, w, 10, 12)
	for i := 10; i < 12; i++ {
		if m, err := sub.NextMsg(5 * time.Second); err != nil || string(m.Data) != strconv.Itoa(i) {
			t.Fatalf("line %d after: %v %v", i, m, err)
		}
	}
}

// TestFeedBufferDropsFromTheLargest: while no node takes them, workload W1 floods
// (past the message bound, then past the byte bound with long lines) and W2 writes a
// line now and then; W3's WORKLOADSTOPPED was queued first of all. The drops fall on
// W1 alone: all of W2's lines and the event come out once a node takes the feeds, W1's
// in order, its first line counting the dropped ones. Before, the oldest went whoever
// they were: W2's early lines and the stop event were pushed out by W1's flood.
func TestFeedBufferDropsFromTheLargest(t *testing.T) {
	for _, c := range []struct {
		name  string
		lines int
		long  int // bytes added to each of W1's lines
	}{
		{"messages", FeedBufferMessages + 5000, 0},
		{"bytes", 2000, 4096},
	} {
		t.Run(c.name, func(t *testing.T) {
			r, ch, _, nc := feedRunner(t)
			sub, err := nc.SubscribeSync("$NEX.FEED.ns.>")
			if err != nil {
				t.Fatal(err)
			}
			_ = sub.SetPendingLimits(-1, -1)
			_ = nc.Flush()
			_ = ch.Close()
			<-r.localDone
			stop := `{"id":"W3","namespace":"ns"}`
			if err := r.feedOut(&nats.Msg{Subject: protocol.EventSubject("ns", protocol.EventWorkloadStopped), Data: []byte(stop)}); err != nil {
				t.Fatal(err)
			}
			w1, w2 := r.Logger("W1", "ns", "stdout"), r.Logger("W2", "ns", "stderr")
			pad := strings.Repeat("x", c.long)
			quiet := 0
			for i := range c.lines {
				if _, err := w1.Write([]byte(strconv.Itoa(i) + " " + pad)); err != nil {
					t.Fatal(err)
				}
				if i%(c.lines/100) == 0 {
					writeLines(t, w2, quiet, quiet+1)
					quiet++
				}
			}
			if err := r.Reregister(); err != nil {
				t.Fatal(err)
			}
			events, w2got, w1got, counted := 0, 0, 0, 0
			prev := -1
			for {
				// Until all that should come has come, a loaded machine's pause is no
				// end; after it, 2 s of quiet are (what more came is counted).
				wait := 2 * time.Second
				if events < 1 || w2got < quiet || prev < c.lines-1 {
					wait = 30 * time.Second
				}
				m, err := sub.NextMsg(wait)
				if err != nil {
					break
				}
				switch m.Subject {
				case protocol.EventSubject("ns", protocol.EventWorkloadStopped):
					events++
				case protocol.LogSubject("ns", "W2", "stderr"):
					if d := m.Header.Get(HeaderFeedDropped); d != "" || string(m.Data) != strconv.Itoa(w2got) {
						t.Errorf("W2's line %d is %q, its count of the dropped %q", w2got, m.Data, d)
					}
					w2got++
				case protocol.LogSubject("ns", "W1", "stdout"):
					num, _, _ := strings.Cut(string(m.Data), " ")
					k, _ := strconv.Atoi(num)
					if k <= prev {
						t.Fatalf("W1's line %d after %d", k, prev)
					}
					if d := m.Header.Get(HeaderFeedDropped); d != "" {
						n, _ := strconv.Atoi(d)
						if n != k-prev-1 {
							t.Errorf("W1's line %d says %d dropped, %d were", k, n, k-prev-1)
						}
						counted += n
					} else if k != prev+1 {
						t.Errorf("W1's line %d follows %d without a count of the dropped", k, prev)
					}
					prev = k
					w1got++
				}
			}
			t.Logf("kept: W1 %d of %d (%d counted dropped), W2 %d of %d, events %d of 1", w1got, c.lines, counted, w2got, quiet, events)
			if events != 1 {
				t.Errorf("%d of W3's WORKLOADSTOPPED events came, want 1", events)
			}
			if w2got != quiet {
				t.Errorf("W2 kept %d of its %d lines, want all", w2got, quiet)
			}
			if prev != c.lines-1 || w1got+counted != c.lines {
				t.Errorf("W1: last line %d, %d came and %d counted dropped, want %d in all", prev, w1got, counted, c.lines)
			}
		})
	}
}

// breakChannel shortens r's wait for a re-registration, names node as the channel's
// (zero: the pair's, the parent), subscribes W1's stdout on nc and closes the node's
// end c, returning once r saw it.
func breakChannel(t *testing.T, r *Runner, c *localchan.Client, nc *nats.Conn, node procid.ID) *nats.Subscription {
	t.Helper()
	r.feedq.mu.Lock()
	r.feedq.heldMax, r.feedq.node = 300*time.Millisecond, node
	r.feedq.mu.Unlock()
	sub, err := nc.SubscribeSync(protocol.LogSubject("ns", "W1", "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.Flush()
	_ = c.Close()
	<-r.localDone
	return sub
}

// TestFeedsOfAdoptingNodeSocketFollowItsProcess: the channel is the socket of a nexd
// that adopted the nexlet (the feed queue names that nexd's process), and it closes.
// While that process runs (it stopped reading: the channel broke under it), the feeds
// go over NATS after the wait, as for a pair under a live parent; once it ended (killed),
// they are held for the next nexd, however long. The nexlet's parent says nothing here:
// an adopted nexlet's is not nexd.
func TestFeedsOfAdoptingNodeSocketFollowItsProcess(t *testing.T) {
	for _, live := range []bool{true, false} {
		t.Run(map[bool]string{true: "live", false: "ended"}[live], func(t *testing.T) {
			r, c, _, nc := feedRunner(t)
			node, err := procid.Of(os.Getpid())
			if !live {
				cmd := exec.Command("/bin/true")
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				node, err = procid.Of(cmd.Process.Pid)
				_ = cmd.Wait()
			}
			if err != nil {
				t.Fatal(err)
			}
			sub := breakChannel(t, r, c, nc, node)
			writeLines(t, r.Logger("W1", "ns", "stdout"), 0, 3)
			m, err := sub.NextMsg(3 * time.Second)
			switch {
			case live && err != nil:
				t.Fatalf("the feeds of a live node's broken socket did not go over NATS: %v", err)
			case !live && err == nil:
				t.Fatalf("a line went over NATS while its node was gone: %q", m.Data)
			}
		})
	}
}
