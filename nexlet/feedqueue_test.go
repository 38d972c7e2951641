package nexlet

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// check verifies the queue's structure: the list and its counts, the entries in
// flight at the front, each workload's unsent lines in order with their cost, and
// the heap.
func (q *feedQueue) check(t *testing.T) {
	t.Helper()
	n, bytes, pos := 0, 0, 0
	unsentAt := -1
	var unsent []*feedEntry
	var prev *feedEntry
	for e := q.first; e != nil; e = e.next {
		if e.prev != prev {
			t.Fatalf("entry %d: prev link broken", n)
		}
		if e == q.unsentHead {
			unsentAt = pos
		}
		if unsentAt >= 0 {
			unsent = append(unsent, e)
			if (e.key != "") != (e.w != nil) {
				t.Fatalf("unsent entry %d (key %q) attached %v", n, e.key, e.w != nil)
			}
		} else if e.w != nil {
			t.Fatalf("entry %d in flight still among its workload's lines", n)
		}
		n++
		pos++
		bytes += e.size
		prev = e
	}
	if prev != q.last {
		t.Fatal("last is not the list's end")
	}
	if q.unsentHead == nil {
		unsentAt = n
	}
	if n != q.n || bytes != q.bytes || unsentAt != q.inflight {
		t.Fatalf("counted %d entries, %d bytes, %d in flight; queue says %d, %d, %d", n, bytes, unsentAt, q.n, q.bytes, q.inflight)
	}
	want := map[string][]*feedEntry{}
	for _, e := range unsent {
		if e.key != "" {
			want[e.key] = append(want[e.key], e)
		}
	}
	if len(want) != len(q.holders) || len(q.heap) != len(q.holders) {
		t.Fatalf("%d workloads with unsent lines, %d holders, %d in the heap", len(want), len(q.holders), len(q.heap))
	}
	for i, h := range q.heap {
		if h.idx != i || q.holders[h.key] != h {
			t.Fatalf("heap entry %d (%s) misplaced", i, h.key)
		}
		if i > 0 && q.heap[(i-1)/2].cost < h.cost {
			t.Fatalf("heap order broken at %d", i)
		}
		cost, k := 0, 0
		for e := h.first; e != nil; e = e.wnext {
			if k >= len(want[h.key]) || want[h.key][k] != e || e.w != h {
				t.Fatalf("workload %s: line %d is not its %dth unsent", h.key, k, k)
			}
			cost += e.cost
			if e.wnext == nil && h.last != e {
				t.Fatalf("workload %s: last is not its list's end", h.key)
			}
			k++
		}
		if k != len(want[h.key]) || cost != h.cost {
			t.Fatalf("workload %s: %d lines costing %d, want %d costing %d", h.key, k, cost, len(want[h.key]), h.cost)
		}
	}
}

// TestFeedQueueModel drives the queue at random, as the runner does: lines of five
// workloads (one of them flooding, with long lines at times) and events are queued
// while batches go out, are acknowledged or refused (taken back), and while feeds go
// out on NATS one by one. After every step the structure holds; at the end every
// subject's messages came in order, and those that came plus the counts they carry
// (HeaderFeedDropped) and those still counted make what was queued; no event was
// dropped while a line was unsent; the bounds held.
func TestFeedQueueModel(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			q := newFeedQueue()
			pushed := map[string]int{}
			got := map[string]int{}    // messages that came
			counts := map[string]int{} // HeaderFeedDropped on them
			next := map[string]int{}   // the number the next must exceed
			events, eventsGot := 0, 0
			deliver := func(m *nats.Msg) {
				k, _ := strconv.Atoi(strings.Fields(string(m.Data))[0])
				if k < next[m.Subject] {
					t.Fatalf("%s: %d after %d", m.Subject, k, next[m.Subject]-1)
				}
				next[m.Subject] = k + 1
				got[m.Subject]++
				counts[m.Subject] += droppedCount(m)
				if strings.Contains(m.Subject, ".events.") {
					eventsGot++
				}
			}
			push := func(subj, pad string) {
				if strings.Contains(subj, ".events.") {
					events++
				}
				ev := protocol.EventSubject("ns", protocol.EventWorkloadStopped)
				evDropped := q.dropped[ev]
				q.push(&nats.Msg{Subject: subj, Data: []byte(strconv.Itoa(pushed[subj]) + " " + pad)})
				pushed[subj]++
				if q.dropped[ev] > evDropped && len(q.heap) > 0 {
					t.Fatal("an event was dropped while lines were unsent")
				}
				if q.n > FeedBufferMessages+q.inflight || (q.bytes > FeedBufferBytes && q.n > q.inflight+1) {
					t.Fatalf("over the bounds: %d messages, %d bytes, %d in flight", q.n, q.bytes, q.inflight)
				}
			}
			long := strings.Repeat("y", 3000)
			for step := range 300000 {
				switch r := rng.IntN(1000); {
				case r < 700: // the flood
					pad := ""
					if step%50000 > 40000 {
						pad = long
					}
					push(protocol.LogSubject("ns", "flood", "stdout"), pad)
				case r < 780:
					w := "w" + strconv.Itoa(rng.IntN(4))
					push(protocol.LogSubject("ns", w, []string{"stdout", "stderr"}[rng.IntN(2)]), "")
				case r < 782:
					push(protocol.EventSubject("ns", protocol.EventWorkloadStopped), "")
				case r < 850 && step%100000 < 30000: // a node takes batches
					if q.unsentHead != nil && len(q.batches) < 8 {
						batch, size, end := q.nextBatch()
						q.id++
						q.scratch = batch[:0]
						q.batchSent(end, len(batch), size)
					}
				case r < 950 && step%100000 < 30000:
					if len(q.batches) > 0 {
						n := q.batches[0].n
						for e, i := q.first, 0; i < n; e, i = e.next, i+1 {
							deliver(e.m)
						}
						q.acked()
					}
				case r < 955:
					q.unsent() // refused, or the channel closed
				case r < 960 && q.inflight == 0 && step%100000 > 90000: // on NATS, one by one
					if q.first != nil {
						deliver(q.marked(q.first))
						q.pop(1)
					}
				}
				if step%997 == 0 {
					q.check(t)
				}
			}
			q.check(t)
			q.unsent()
			for q.first != nil {
				deliver(q.marked(q.first))
				q.pop(1)
			}
			q.check(t)
			t.Logf("events %d of %d came; %d of the flood's %d lines, %d of w0's %d", eventsGot, events,
				got[protocol.LogSubject("ns", "flood", "stdout")], pushed[protocol.LogSubject("ns", "flood", "stdout")],
				got[protocol.LogSubject("ns", "w0", "stdout")], pushed[protocol.LogSubject("ns", "w0", "stdout")])
			for subj, p := range pushed {
				if got[subj]+counts[subj]+q.dropped[subj] != p {
					t.Errorf("%s: %d came, %d counted dropped, %d still counted; %d queued", subj, got[subj], counts[subj], q.dropped[subj], p)
				}
			}
			for subj, p := range pushed {
				if !strings.Contains(subj, ".flood.") && got[subj] != p {
					t.Errorf("%s lost %d of %d", subj, p-got[subj], p)
				}
			}
		})
	}
}
