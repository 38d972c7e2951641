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
// killed (kill -9) and started again a few seconds later (live_restore). The flood
// fills the nexlet's 4 MiB of held feeds within the outage; the drops fall on it, so
// every line the quiet workload printed reaches its subscriber, and the flood's next
// line after a drop counts the dropped ones (Nexd-Feed-Dropped). Before, the oldest
// held lines went whoever's they were: the quiet workload lost those of the outage.
func TestFeedFloodSparesQuietWorkloadAcrossNexdKill(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	srv, acct, sigSeed, creds := operatorNATS(t)
	url := srv.ClientURL()
	state := t.TempDir()
	opts := func(cg string) nodeOpts {
		return nodeOpts{external: url, stateDir: state, cgroup: cg, extra: signingFlags(creds, sigSeed, acct, "--state", "kv", "--live-restore")}
	}
	n := startNode(t, opts(""))
	n.waitReady(t)
	at := testkit.WriteFile(t, filepath.Join(testkit.PublicDir(t), "counter"), "")
	if err := os.Chmod(at, 0o666); err != nil {
		t.Fatal(err)
	}
	printed := func() int {
		for range 1000 { // the shell truncates the file before it writes the number
			b, _ := os.ReadFile(at)
			if k, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return k
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatal("the workload's number is not in its file")
		return 0
	}
	quiet := n.runWorkload(t, "--nats.creds-file", creds, "--bids", "1", "--name", "quiet", "--",
		"/bin/sh", "-c", `i=0; while :; do i=$((i+1)); echo "line $i"; echo $i > "$0"; sleep 0.02; done`, at)
	flood := n.runWorkload(t, "--nats.creds-file", creds, "--bids", "1", "--name", "flood", "--",
		"/bin/sh", "-c", `s=$(printf '%16000s' | tr ' ' x); while :; do echo "$s"; done`)

	nc, err := nats.Connect(url, nats.UserCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	lines := make(chan int, 1<<16)
	sub, err := nc.Subscribe("$NEX.FEED.*.logs."+quiet.ID+".stdout", func(m *nats.Msg) {
		if v, ok := strings.CutPrefix(string(m.Data), "line "); ok {
			if k, err := strconv.Atoi(v); err == nil {
				lines <- k
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = sub.SetPendingLimits(-1, -1)
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

	var got []int
	next := func(what string, timeout time.Duration, stop func(k int) bool) {
		t.Helper()
		deadline := time.After(timeout)
		for {
			select {
			case k := <-lines:
				got = append(got, k)
				if stop(k) {
					return
				}
			case <-deadline:
				t.Fatalf("%s: %d lines so far, the last %v", what, len(got), got[max(0, len(got)-5):])
			}
		}
	}
	count := 0
	next("lines before the kill", 60*time.Second, func(int) bool { count++; return count >= 25 })
	testkit.EventuallyWithin(t, 30*time.Second, "the flood's lines reach the feed", func() bool { return floodLines.Load() > 0 })
	n.cmd.Process.Kill()
	n.wait(t, 30*time.Second)
	killedAt := printed()
	// 100 quiet lines (2 s or more) while no nexd runs: the flood's 3 MB/s and its
	// burst fill the 4 MiB many times over.
	for deadline := time.Now().Add(30 * time.Second); printed() < killedAt+100 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	n2 := startNode(t, opts(n.cgroup))
	n2.waitReady(t)
	readyAt := printed()
	next("lines after the restart", 90*time.Second, func(k int) bool { return k >= readyAt+50 })
	time.Sleep(500 * time.Millisecond)
	for drained := false; !drained; {
		select {
		case k := <-lines:
			got = append(got, k)
		default:
			drained = true
		}
	}
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
	t.Logf("quiet lines %d..%d (%d..%d printed while no nexd was ready): %d lost; flood: %d lines came, %d counted dropped",
		got[0], high, killedAt, readyAt, lost, floodLines.Load(), floodDropped.Load())
	if readyAt-killedAt < 50 {
		t.Errorf("only %d quiet lines printed while nexd was down: the window is too short to tell", readyAt-killedAt)
	}
	if lost > 0 {
		t.Errorf("the quiet workload lost %d lines to the flood across the kill of nexd (want 0)", lost)
	}
	if floodDropped.Load() == 0 {
		t.Error("no flood line counted dropped ones: the buffer never filled, the test tells nothing")
	}
}
