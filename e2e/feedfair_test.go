package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestFeedFloodSparesQuietWorkloadAcrossNexdKill: two workloads of the native nexlet,
// one printing a numbered line every ~20 ms, the other 16 KB lines as fast as the
// nexlet takes them (its output limit: ~3 MB/s, a burst of 16 MB), while nexd is
// killed (kill -9) and started again once the flood printed 1,000 lines (live_restore). The flood
// fills the nexlet's 4 MiB of held feeds within the outage; the drops fall on it, so
// every line the quiet workload printed reaches its subscriber, and the flood's next
// line after a drop counts the dropped ones (Nexd-Feed-Dropped). Before, the oldest
// held lines went whoever's they were: the quiet workload lost those of the outage.
// And before, the nexlet's log (its FIFO, unread while no nexd ran) stopped its reading
// of every workload's output once the flood's 16 KB log line fitted only in part: the
// flood printed nothing more, the buffer never filled ("no flood line counted dropped
// ones"), and in a long outage the quiet workload's lines waited in its pipe and about
// half of them went over its output limit when nexd came back (nexlet/native
// TestFloodIntoUnreadLogSparesQuietWorkload).
func TestFeedFloodSparesQuietWorkloadAcrossNexdKill(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	f := newFeedKill(t)
	n := f.start(t, "")
	quiet := n.runWorkload(t, "--nats.creds-file", f.creds, "--bids", "1", "--name", "quiet", "--",
		"/bin/sh", "-c", `i=0; while :; do i=$((i+1)); echo "line $i"; echo $i > "$0"; sleep 0.02; done`, f.counter)
	floodCounter := newCounter(t, "flood")
	flood := n.runWorkload(t, "--nats.creds-file", f.creds, "--bids", "1", "--name", "flood", "--",
		"/bin/sh", "-c", `s=$(printf '%16000s' | tr ' ' x); i=0; while :; do echo "$s"; i=$((i+1)); echo $i > "$0"; done`, floodCounter)
	lt := f.lines(t, quiet.ID)
	nc, err := nats.Connect(f.url, nats.UserCredentials(f.creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	var floodLines, floodDropped atomic.Int64
	fsub, err := nc.Subscribe("$NEX.FEED.*.logs."+flood.ID+".stdout", func(m *nats.Msg) {
		floodLines.Add(1)
		if d, err := strconv.Atoi(m.Header.Get(protocol.HeaderFeedDropped)); err == nil {
			floodDropped.Add(int64(d))
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = fsub.SetPendingLimits(-1, -1)
	flush(t, nc)

	count := 0
	lt.next(t, "lines before the kill", 60*time.Second, func(int) bool { count++; return count >= 25 })
	testkit.EventuallyWithin(t, 30*time.Second, "the flood's lines reach the feed", func() bool { return floodLines.Load() > 0 })
	n.cmd.Process.Kill()
	n.wait(t, 30*time.Second)
	killedAt, floodAt := f.printed(t), readCount(t, floodCounter)
	// 100 quiet lines (2 s or more) and 1,000 of the flood's (16 MB; at its output
	// limit 5 s, of which the nexlet forwards far more than the 4 MiB it holds) while
	// no nexd runs: conditions, not a time, so that a loaded host that runs the flood
	// slowly only makes the outage longer.
	f.waitPrinted(t, killedAt+100)
	waitCount(t, floodCounter, floodAt+1000, 90*time.Second)
	floodDown := readCount(t, floodCounter) - floodAt
	f.start(t, n.cgroup)
	readyAt := f.printed(t)
	lt.next(t, "lines after the restart", 90*time.Second, func(k int) bool { return k >= readyAt+50 })
	got := lt.drain()
	seen := map[int]bool{}
	high := 0
	for _, k := range got {
		seen[k] = true
		high = max(high, k)
	}
	lost := 0
	for k := got[0]; k <= high; k++ {
		if !seen[k] {
			lost++
		}
	}
	t.Logf("quiet lines %d..%d (%d..%d printed while no nexd was ready): %d lost; flood: %d lines printed while nexd was down, %d lines came, %d counted dropped",
		got[0], high, killedAt, readyAt, lost, floodDown, floodLines.Load(), floodDropped.Load())
	if readyAt-killedAt < 50 {
		t.Errorf("only %d quiet lines printed while nexd was down: the window is too short to tell", readyAt-killedAt)
	}
	if lost > 0 {
		t.Errorf("the quiet workload lost %d lines to the flood across the kill of nexd (want 0)", lost)
	}
	if floodDropped.Load() == 0 {
		t.Errorf("no flood line counted dropped ones (%d printed while nexd was down): the buffer never filled, the test tells nothing", floodDown)
	}
}

// feedKill is an operator-mode NATS server and the options of a node on it with
// live_restore, to kill and start again, and a file a workload writes its line count
// to (counter, writable by any uid): what it printed by a given moment.
type feedKill struct {
	opts    func(cg string) nodeOpts
	creds   string
	url     string
	counter string
}

func newFeedKill(t *testing.T) *feedKill {
	t.Helper()
	srv, acct, sigSeed, creds := operatorNATS(t)
	url := srv.ClientURL()
	state := t.TempDir()
	f := &feedKill{creds: creds, url: url, opts: func(cg string) nodeOpts {
		return nodeOpts{external: url, stateDir: state, cgroup: cg, extra: signingFlags(creds, sigSeed, acct, "--state", "kv", "--live-restore")}
	}}
	f.counter = newCounter(t, "counter")
	return f
}

// newCounter makes a file in the test's public directory that a workload of any uid
// may write its line count to.
func newCounter(t *testing.T, name string) string {
	t.Helper()
	path := testkit.WriteFile(t, filepath.Join(testkit.PublicDir(t), name), "")
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	return path
}

// start starts a node in cgroup cg ("": a new one) and waits until it is ready.
func (f *feedKill) start(t *testing.T, cg string) *node {
	t.Helper()
	n := startNode(t, f.opts(cg))
	n.waitReady(t)
	return n
}

// printed is the workload's count: what it printed by now.
func (f *feedKill) printed(t *testing.T) int {
	t.Helper()
	return readCount(t, f.counter)
}

// readCount is the number a workload last wrote to its counter file.
func readCount(t *testing.T, counter string) int {
	t.Helper()
	for range 1000 { // the shell truncates the file before it writes the number
		b, _ := os.ReadFile(counter)
		if k, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			return k
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("the workload's number is not in its file")
	return 0
}

// waitPrinted waits (at most 30 s, however slowly a loaded host runs the workload)
// until the workload printed k lines.
func (f *feedKill) waitPrinted(t *testing.T, k int) {
	t.Helper()
	waitCount(t, f.counter, k, 30*time.Second)
}

// waitCount waits (at most timeout) until counter says k or more.
func waitCount(t *testing.T, counter string, k int, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); readCount(t, counter) < k && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
}

// lineTaker takes the numbers of a workload's "line N" log lines from its feed.
type lineTaker struct {
	lines chan int
	got   []int
}

// lines subscribes to workload id's stdout feed.
func (f *feedKill) lines(t *testing.T, id string) *lineTaker {
	t.Helper()
	nc, err := nats.Connect(f.url, nats.UserCredentials(f.creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	lt := &lineTaker{lines: make(chan int, 1<<16)}
	sub, err := nc.Subscribe("$NEX.FEED.*.logs."+id+".stdout", func(m *nats.Msg) {
		if v, ok := strings.CutPrefix(string(m.Data), "line "); ok {
			if k, err := strconv.Atoi(v); err == nil {
				lt.lines <- k
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	flush(t, nc)
	return lt
}

// next takes lines until stop says so, failing after timeout.
func (lt *lineTaker) next(t *testing.T, what string, timeout time.Duration, stop func(k int) bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case k := <-lt.lines:
			lt.got = append(lt.got, k)
			if stop(k) {
				return
			}
		case <-deadline:
			t.Fatalf("%s: %d lines so far, the last %v", what, len(lt.got), lt.got[max(0, len(lt.got)-5):])
		}
	}
}

// drain takes the lines still in flight (for half a second) and returns all taken.
func (lt *lineTaker) drain() []int {
	time.Sleep(500 * time.Millisecond)
	for {
		select {
		case k := <-lt.lines:
			lt.got = append(lt.got, k)
		default:
			return lt.got
		}
	}
}
