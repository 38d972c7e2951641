package node

import (
	"context"
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
	sent := heldListAnswers(t, a, partSize, held, gate, false)
	return sent, len(listPart("", partSize))
}

// heldListAnswers is rogueListAnswers; honest, the nexlet answers each list with rows of
// the list's namespace (of no namespace for the system's: the node's own rows), as one
// that runs that many of the namespace's workloads, and holds back the last part of
// its answers to tenant namespaces' lists only: the system namespace's it answers whole.
// The parts it sent counts those of the answers it holds back.
func heldListAnswers(t *testing.T, a *fakeAgent, partSize, held int, gate <-chan struct{}, honest bool) *atomic.Int64 {
	t.Helper()
	sent := &atomic.Int64{}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	if _, err := a.nc.Subscribe(protocol.AgentPrefix(a.nodeID)+"."+a.id+".QUERYWORKLOADS", func(m *nats.Msg) {
		var req protocol.AgentListWorkloadsRequest
		_ = json.Unmarshal(m.Data, &req)
		ns, hold := "", true
		if honest && req.Namespace != protocol.SystemNamespace {
			ns = req.Namespace
		} else if honest {
			hold = false
		}
		part := listPart(ns, partSize)
		wg.Add(1)
		go func() {
			defer wg.Done()
			of := strconv.Itoa(held + 1)
			for i := 1; i <= held; i++ {
				if err := a.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Data: part,
					Header: nats.Header{protocol.HeaderListPart: {strconv.Itoa(i) + "/" + of}}}); err != nil {
					return
				}
				if hold {
					sent.Add(1)
				}
			}
			_ = a.nc.Flush()
			if hold {
				<-gate
			}
			_ = a.nc.PublishMsg(&nats.Msg{Subject: m.Reply, Data: []byte("[]"),
				Header: nats.Header{protocol.HeaderListPart: {of + "/" + of}}})
		}()
	}); err != nil {
		t.Fatal(err)
	}
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sent
}

// listPart is an answer part of at most partSize+1 bytes: rows of namespace ns (none
// when empty), each with the id "big-" and ns.
func listPart(ns string, partSize int) []byte {
	w := protocol.WorkloadSummary{ID: "big-" + ns, Name: "big", Runtime: "--", StartTime: "2026-12-05T00:00:00Z",
		Tags: map[string]string{}, WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, WorkloadType: "big"}
	if ns != "" {
		w.Namespace = &ns
	}
	row, _ := json.Marshal(w)
	return []byte("[" + strings.Repeat(string(row)+",", partSize/(len(row)+1)-1) + string(row) + "]")
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

// AttackRogueNexletListMemory is TestAttackRogueNexletListMemory (in
// dropmetrics_test.go, which then scrapes the metric of its drops), returning its node:
// a rogue nexlet (its minted user, answering on its own reply subjects) answers each of
// 16 lists one tenant asks at once, and one of another tenant, with 6 MiB of parts and
// holds back the last. The node's heap is measured once the node took in every part
// sent (counted), while every list is under way. Before, the bound was 64 MiB per
// answer and each list held the rogue's 6 MiB: the heap grew by about 100 MiB (16 + 1
// lists), N times one answer. Now the node's memory for lists (128 MiB here: a nexlet's
// share 32 MiB, one tenant namespace's quarter of it 8 MiB) holds one tenant answer of
// the rogue and one of the other tenant, and refuses the others as they come: the lists
// they belong to are marked partial, never whole. The honest nexlet's answers are all
// taken: every list, the other tenant's too, has its workload.
func AttackRogueNexletListMemory(t *testing.T) *Node {
	const (
		lists    = 16
		partSize = 512 << 10
		held     = 12 // parts held back by the rogue's answer: 6 MiB
		memory   = 128 << 20
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
	budgetEmpty(t, n.lists)

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
	return n
}

// budgetEmpty fails t unless b holds nothing: every list gave back what it held.
func budgetEmpty(t *testing.T, b *listBudget) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.held != 0 || b.heldTenant != 0 || len(b.byNexlet) != 0 || len(b.byTenants) != 0 || len(b.byNS) != 0 {
		t.Errorf("after the lists the node counts %d bytes held (tenants %d): %v %v %v", b.held, b.heldTenant, b.byNexlet, b.byTenants, b.byNS)
	}
}

// TestListBudgetShares: a nexlet's answers hold at most its share (a quarter of the
// whole), those to tenant namespaces' lists half of it and half of the whole, one tenant
// namespace's a quarter of the share; the system namespace's the whole share, what the
// tenants leave of it kept for them; the whole bound holds whatever the nexlets; what is
// given back may be taken again.
func TestListBudgetShares(t *testing.T) {
	b := newListBudget(64, nil) // share 16; tenants 8 of it and 32 of all; a tenant namespace 4
	steps := []struct {
		nexlet, ns string
		size       int64
		ok         bool
	}{
		{"a", "t1", 4, true},
		{"a", "t1", 1, false}, // a quarter of the share, in one tenant namespace
		{"a", "t2", 4, true},  // another namespace has its own quarter
		{"a", "t3", 1, false}, // tenants together: half the share
		{"a", "system", 8, true},
		{"a", "system", 1, false}, // the share
		{"b", "t1", 4, true},
		{"b", "t2", 4, true},
		{"c", "t1", 4, true},
		{"c", "t2", 4, true},
		{"d", "t1", 4, true},
		{"d", "t2", 4, true},  // tenants hold 32, half the whole
		{"e", "t1", 1, false}, // tenants together: half the whole
		{"e", "system", 16, true},
		{"f", "system", 8, true},
		{"g", "system", 1, false}, // the whole bound: 64
	}
	for i, s := range steps {
		if err := b.take(s.nexlet, s.ns, s.size); (err == nil) != s.ok {
			t.Fatalf("step %d (%s %s %d): %v, want taken %t", i, s.nexlet, s.ns, s.size, err, s.ok)
		}
	}
	b.give("a", "t1", 4)
	b.give("f", "system", 8)
	if err := b.take("g", "t1", 4); err != nil {
		t.Fatalf("after a gave back: %v", err)
	}
	for _, g := range []struct {
		nexlet, ns string
		size       int64
	}{{"a", "t2", 4}, {"a", "system", 8}, {"b", "t1", 4}, {"b", "t2", 4}, {"c", "t1", 4}, {"c", "t2", 4},
		{"d", "t1", 4}, {"d", "t2", 4}, {"e", "system", 16}, {"g", "t1", 4}} {
		b.give(g.nexlet, g.ns, g.size)
	}
	budgetEmpty(t, b)
}

// TestAttackTenantFloodsStarveSystemList: four tenants each send 4 lists at once to a
// node whose honest nexlet answers each with 400 KB of its rows of that namespace and is
// slow to send the last part (it is held back), and while they are under way the node
// lists all its workloads as the drain, a shutdown's stop-all and the control socket
// do. Before, a tenant namespace's lists could hold half of the nexlet's share and two
// tenants' all of it: the node's own list was refused that nexlet's answer and came
// back partial, lacking its workloads, until the floods ended. Now the tenants' lists
// together hold at most half of the nexlet's share (one namespace a quarter), and the
// node's list comes back whole; the tenants' lists past that are partial, never whole
// and short.
func TestAttackTenantFloodsStarveSystemList(t *testing.T) {
	const (
		tenants  = 4
		lists    = 4 // a tenant's at once
		partSize = 100 << 10
		held     = 4 // parts of an answer to a tenant's list held by the node: 400 KB
		// The node's memory for lists: a nexlet's share 2 MiB, before a tenant
		// namespace's half of it (two answers), now a quarter (one), the tenants'
		// together half (two). A list of the whole answer fits in a WPING's one message.
		memory = 8 << 20
	)
	rf := newRogueFixture(t, func(o *Options) {
		o.FanoutTimeout = time.Minute // the lists wait for the nexlet's last parts, not a clock
		o.ListMemory = memory
	})
	n := rf.nodes[0]
	honest := rf.minted("honest0", "native-nexlet", "native", nil)
	honest.mute.Store(true) // its lists are heldListAnswers'
	gate := make(chan struct{})
	sent := heldListAnswers(t, honest, partSize, held, gate, true)
	var once sync.Once
	open := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)

	nss := make([]string, tenants)
	results := make([]listResult, tenants*lists)
	var wg sync.WaitGroup
	var done atomic.Int64
	for i := range nss {
		nss[i] = fmt.Sprintf("tenant%d", i+1) // of one length: every answer has one size
		tc := rf.tenant(nss[i])
		for j := range lists {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer done.Add(1)
				results[i*lists+j] = wping(tc.nc, nss[i], 2*time.Minute)
			}()
		}
	}
	// Every tenant's list either answered (the nexlet's answer refused: the list is
	// over) or holding all its parts but the last, all taken in by the node.
	answer := int64(held * len(listPart(nss[0], partSize)))
	testkit.Eventually(t, "the nexlet's answers to the tenants taken or refused", func() bool {
		h := n.lists.heldBy("honest0")
		return sent.Load() == int64(len(results)*held) && h%answer == 0 && done.Load()+h/answer == int64(len(results))
	})
	tenantsHeld, refused := n.lists.heldBy("honest0"), n.lists.refused.Load()

	// The node's own list, as the drain's, while the floods hold what they may.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	list, missing, err := n.WorkloadList(ctx)
	rows := 0
	for _, w := range list {
		if w.ID == "big-" {
			rows++
		}
	}
	t.Logf("%d tenants' %d lists at once: the nexlet's answers to them hold %d bytes (%d answers, its share %d), %d refused; the node's list: %d of its rows, missing %v, err %v",
		tenants, len(results), tenantsHeld, tenantsHeld/answer, n.lists.share, refused, rows, missing, err)
	if err != nil || len(missing) != 0 {
		t.Errorf("the node's list while tenants flood theirs: missing %v, err %v; want it whole", missing, err)
	}
	var part []protocol.WorkloadSummary
	if err := json.Unmarshal(listPart("", partSize), &part); err != nil {
		t.Fatal(err)
	}
	if err == nil && len(missing) == 0 && rows != held*len(part) {
		t.Errorf("the node's whole list has %d of the nexlet's rows, want %d", rows, held*len(part))
	}
	if tenantsHeld > n.lists.share/2 {
		t.Errorf("the tenants' lists hold %d bytes of the nexlet's answers, want at most half its share, %d", tenantsHeld, n.lists.share/2)
	}
	open()
	wg.Wait()
	budgetEmpty(t, n.lists)

	whole := map[string]int{}
	for i, r := range results {
		ns := nss[i/lists]
		switch {
		case r.err != nil:
			t.Errorf("list %d of %s: %v", i%lists, ns, r.err)
		case r.partial == "":
			if len(r.ids) == 0 || slices.ContainsFunc(r.ids, func(id string) bool { return id != "big-"+ns }) {
				t.Errorf("list %d of %s whole with rows %.100v, want only its own", i%lists, ns, r.ids)
			}
			whole[ns]++
		case !strings.Contains(r.partial, `"missing_count":1`) || len(r.ids) != 0:
			t.Errorf("list %d of %s: partial %q with %d rows, want the one nexlet missing and none", i%lists, ns, r.partial, len(r.ids))
		}
	}
	t.Logf("tenants' lists whole: %v", whole)
	total := 0
	for _, ns := range nss {
		if total += whole[ns]; int64(whole[ns]) > n.lists.share/4/answer {
			t.Errorf("%d lists of %s whole at once, want at most what a quarter of the nexlet's share holds", whole[ns], ns)
		}
	}
	if uint64(len(results)-total) != refused {
		t.Errorf("%d tenants' lists whole, %d answers refused: want every other list partial", total, refused)
	}
}
