package node

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// rogueListAnswers makes a (muted) nexlet answer every QUERYWORKLOADS asked of it alone
// in held parts of about partSize bytes each (rows of no namespace, which only a
// system list shows), of held+1: the last one only once gate is closed. It returns
// how many parts it sent so far and the size of each.
func rogueListAnswers(t *testing.T, a *fakeAgent, partSize, held int, gate <-chan struct{}) (*atomic.Int64, int) {
	t.Helper()
	row, _ := json.Marshal(protocol.WorkloadSummary{ID: "rogue", Name: "rogue", Runtime: "--", StartTime: "2026-12-05T00:00:00Z",
		Tags: map[string]string{}, WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, WorkloadType: "rogue"})
	part := []byte("[" + strings.Repeat(string(row)+",", partSize/(len(row)+1)-1) + string(row) + "]")
	sent := &atomic.Int64{}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	if _, err := a.nc.Subscribe(protocol.AgentPrefix(a.nodeID)+"."+a.id+".QUERYWORKLOADS", func(m *nats.Msg) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			of := strconv.Itoa(held + 1)
			for i := 1; i <= held; i++ {
				if err := a.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Data: part,
					Header: nats.Header{protocol.HeaderListPart: {strconv.Itoa(i) + "/" + of}}}); err != nil {
					return
				}
				sent.Add(1)
			}
			_ = a.nc.Flush()
			<-gate
			_ = a.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Data: []byte("[]"),
				Header: nats.Header{protocol.HeaderListPart: {of + "/" + of}}})
		}()
	}); err != nil {
		t.Fatal(err)
	}
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sent, len(part)
}

// listResult is one WPING's answer as the test saw it.
type listResult struct {
	ids     []string
	partial string
	err     error
}

// wping lists namespace ns from nc, waiting up to wait.
func wping(nc *nats.Conn, ns string, wait time.Duration) listResult {
	body, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: ns, Filter: []string{}})
	m, err := nc.Request(protocol.WPingSubject(ns), body, wait)
	if err != nil {
		return listResult{err: err}
	}
	var ws []protocol.WorkloadSummary
	if err := json.Unmarshal(m.Data, &ws); err != nil {
		return listResult{err: fmt.Errorf("body %.200q: %w", m.Data, err)}
	}
	r := listResult{partial: m.Header.Get(protocol.HeaderPartial)}
	for _, w := range ws {
		r.ids = append(r.ids, w.ID)
	}
	return r
}

// heapNow is the live heap after two collections (the second empties the sync.Pools the
// first left: the in-process server's buffers).
func heapNow() int64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// peakRSS reads the process's peak resident set (VmHWM, KiB) and, with reset, starts it
// again from the current one; 0 where /proc says nothing.
func peakRSS(reset bool) int64 {
	if reset {
		_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
	}
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb
		}
	}
	return 0
}

// TestAttackRogueNexletListMemory: a rogue nexlet (its minted user, answering on its own
// reply subjects) answers each of 16 lists one tenant asks at once, and one of another
// tenant, with 6 MiB of parts and holds back the last. The node's heap is measured once
// the node took in every part sent (counted), while every list is under way. Before,
// the bound was 64 MiB per answer and each list held the rogue's 6 MiB: the heap grew
// by about 100 MiB (16 + 1 lists), N times one answer. Now the node's memory for lists
// (64 MiB here: a nexlet's share 16 MiB, one tenant namespace's half of it 8 MiB)
// holds one tenant answer of the rogue and one of the other tenant, and refuses the
// others as they come: the lists they belong to are marked partial, never whole. The
// honest nexlet's answers are all taken: every list, the other tenant's too, has its
// workload.
func TestAttackRogueNexletListMemory(t *testing.T) {
	const (
		lists    = 16
		partSize = 512 << 10
		held     = 12 // parts held back by the rogue's answer: 6 MiB
		memory   = 64 << 20
	)
	rf := newRogueFixture(t, func(o *Options) {
		o.FanoutTimeout = time.Minute // the lists wait for the rogue's last parts, not a clock
		o.ListMemory = memory
	})
	n := rf.nodes[0]
	rf.minted("agent0", "native-nexlet", "native", nil)
	rogue := rf.minted("rogue0", "rogue", "rogue", nil)
	rogue.mute.Store(true)
	mine, theirs := rf.deployOne("tenant"), rf.deployOne("other")
	gate := make(chan struct{})
	sent, size := rogueListAnswers(t, rogue, partSize, held, gate)
	tenant, other := rf.tenant("tenant"), rf.tenant("other")
	var once sync.Once
	open := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)

	before, rss := heapNow(), peakRSS(true)
	results := make([]listResult, lists+1)
	var wg sync.WaitGroup
	var done atomic.Int64
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer done.Add(1)
			if i == lists {
				results[i] = wping(other.nc, "other", 2*time.Minute)
				return
			}
			results[i] = wping(tenant.nc, "tenant", 2*time.Minute)
		}()
	}
	// Every list either answered (the rogue's answer refused: the list is over) or
	// holding the rogue's parts but the last, all taken in by the node.
	answer := int64(held * size)
	testkit.Eventually(t, "the rogue's answers taken or refused", func() bool {
		h := n.lists.heldBy("rogue0")
		return sent.Load() == int64((lists+1)*held) && h%answer == 0 && done.Load()+h/answer == lists+1
	})
	grew := (heapNow() - before) >> 20
	rogueHeld, maxHeld, refused := n.lists.heldBy("rogue0"), n.lists.maxHeldAt.Load(), n.lists.refused.Load()
	t.Logf("%d lists at once, the rogue's answers %d MiB each: heap grew %d MiB, peak RSS %d MiB over the start's; the rogue's answers hold %d bytes, the most held at once %d, %d answers refused",
		lists+1, held*partSize>>20, grew, (peakRSS(false)-rss)>>10, rogueHeld, maxHeld, refused)
	open()
	wg.Wait()
	// Each list gave back what it held as it ended.
	n.lists.mu.Lock()
	if n.lists.held != 0 || len(n.lists.byNexlet) != 0 || len(n.lists.byNS) != 0 {
		t.Errorf("after the lists the node counts %d bytes held: %v %v", n.lists.held, n.lists.byNexlet, n.lists.byNS)
	}
	n.lists.mu.Unlock()

	// One answer of the rogue's per namespace fits; the measure leaves room for what
	// the heap counts besides (the server's, the test's), not for another answer.
	if bound := int64(3 * held * partSize >> 20); grew > bound {
		t.Errorf("the node's heap grew %d MiB with %d lists at once; want at most %d", grew, lists+1, bound)
	}
	// At most 8 MiB of the rogue's answers to the tenant's lists and one of 6 MiB to
	// the other's, with the honest nexlet's small ones: within one nexlet's share.
	if maxHeld > memory/4 {
		t.Errorf("the node held %d bytes of list answers at once; want at most one nexlet's share, %d", maxHeld, memory/4)
	}
	whole := 0
	for i, r := range results {
		wid := mine
		if i == lists {
			wid = theirs
		}
		switch {
		case r.err != nil:
			t.Errorf("list %d: %v", i, r.err)
		case !slices.Contains(r.ids, wid):
			t.Errorf("list %d: rows %v lack the honest nexlet's workload %s (partial %q)", i, r.ids, wid, r.partial)
		case r.partial == "":
			whole++ // the rogue's answer taken: its rows are no tenant's
		case !strings.Contains(r.partial, `"missing_count":1`):
			t.Errorf("list %d: partial %q, want the one nexlet (the rogue) missing", i, r.partial)
		}
	}
	if whole > 2 || uint64(lists+1-whole) != refused {
		t.Errorf("%d lists whole, %d answers refused: want at most one a namespace whole, the others partial", whole, refused)
	}
}

// TestListBudgetShares: a nexlet's answers hold at most its share (a quarter of the
// whole), those to one tenant namespace's lists half of it, the system namespace's the
// whole share; the whole bound holds whatever the nexlets; what is given back may be
// taken again.
func TestListBudgetShares(t *testing.T) {
	b := newListBudget(64, nil) // share 16, a tenant namespace's 8
	steps := []struct {
		nexlet, ns string
		size       int64
		ok         bool
	}{
		{"a", "t1", 8, true},
		{"a", "t1", 1, false}, // half the share, in one tenant namespace
		{"a", "t2", 8, true},  // another namespace has its own half
		{"a", "system", 1, false},
		{"b", "system", 16, true}, // system: the whole share
		{"b", "t1", 1, false},
		{"c", "system", 16, true},
		{"d", "system", 16, true},
		{"e", "system", 1, false}, // the whole bound: 64
	}
	for i, s := range steps {
		if err := b.take(s.nexlet, s.ns, s.size); (err == nil) != s.ok {
			t.Fatalf("step %d (%s %s %d): %v, want taken %t", i, s.nexlet, s.ns, s.size, err, s.ok)
		}
	}
	b.give("a", "t1", 8)
	if err := b.take("e", "t1", 8); err != nil {
		t.Fatalf("after a gave back: %v", err)
	}
	for _, g := range []struct {
		nexlet, ns string
		size       int64
	}{{"a", "t2", 8}, {"b", "system", 16}, {"c", "system", 16}, {"d", "system", 16}, {"e", "t1", 8}} {
		b.give(g.nexlet, g.ns, g.size)
	}
	if b.held != 0 || len(b.byNexlet) != 0 || len(b.byNS) != 0 {
		t.Errorf("all given back: held %d, %v %v", b.held, b.byNexlet, b.byNS)
	}
}
