package native

import (
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// lineTimes is a Feed that notes when each workload's first line came.
type lineTimes struct {
	mu    sync.Mutex
	first map[string]time.Time
	came  chan string
}

func (f *lineTimes) Logger(id, _, _ string) io.Writer {
	return feedFunc(func() {
		now := time.Now()
		f.mu.Lock()
		_, seen := f.first[id]
		if !seen {
			f.first[id] = now
		}
		f.mu.Unlock()
		if !seen {
			f.came <- id
		}
	})
}

func (f *lineTimes) EmitEvent(string, string, any) error { return nil }

type feedFunc func()

func (w feedFunc) Write(p []byte) (int, error) { w(); return len(p), nil }

// BenchmarkStartAnnouncement is a placement's last leg in the nexlet: a start of
// /bin/sh that echoes a line and execs sleep, from the start's call to its return (the
// reply) and to the line's arrival on the feed, as the cgroup variant of
// BenchmarkStartWorkload meets it (the pools refilled and the previous workload
// stopped off the clock), with the runner's StartReplied right after the return.
// Reported: p50 of the reply, of the line, of the line after the reply (0 when it came
// first, as nexbench counts it), and the share of lines that came before the reply.
func BenchmarkStartAnnouncement(b *testing.B) {
	n := benchNexletLog(b, DefaultUIDPool, cgroupSpec(b), slog.New(slog.DiscardHandler))
	forkPool := func() int { return DefaultForkPool }
	if c, ok := n.iso.(cgIsolation); ok {
		forkPool = c.pool.Ready
	}
	feed := &lineTimes{first: map[string]time.Time{}, came: make(chan string, 1)}
	n.SetFeed(feed)
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "echo nexbench-ready; exec sleep 600"}}
	var reply, line, after []time.Duration
	before := 0
	i := 0
	for b.Loop() {
		b.StopTimer()
		id, req := nextBenchStart(b, n, "ann", &i, run, true, forkPool)
		b.StartTimer()
		t0 := time.Now()
		if _, err := n.StartWorkload(id, &req, false); err != nil {
			b.Fatal(err)
		}
		tr := time.Now()
		n.StartReplied(id) // as the runner does once the reply is written
		<-feed.came
		feed.mu.Lock()
		tl := feed.first[id]
		feed.mu.Unlock()
		reply, line = append(reply, tr.Sub(t0)), append(line, tl.Sub(t0))
		if tl.Before(tr) {
			before++
			after = append(after, 0)
		} else {
			after = append(after, tl.Sub(tr))
		}
	}
	b.StopTimer()
	_ = n.StopWorkload(fmt.Sprintf("ann%d", i-1), &protocol.StopWorkloadRequest{Namespace: testNS})
	p50 := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2]) / float64(time.Microsecond)
	}
	b.ReportMetric(p50(reply), "reply-p50-µs")
	b.ReportMetric(p50(line), "line-p50-µs")
	b.ReportMetric(p50(after), "after-reply-p50-µs")
	b.ReportMetric(100*float64(before)/float64(i), "line-first-%")
}
