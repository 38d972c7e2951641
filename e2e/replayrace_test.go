package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestReplayOfQueuedStartRunsOnce: a job's start has reached the native nexlet and
// waits there for its turn (the nexlet's 64 slots for slow requests are taken by 64
// starts whose nats:// artifacts a slow object store holds: a proxy in front of a real
// nats-server holds each fetch's first request for the bucket) when nexd is killed
// (-9); the nexlet outlives it. The next nexd on the same state adopts the nexlet and
// reconciles: every record is unmarked (no start answered), and the queued job is in no
// table of the nexlet's yet. Then the object store answers, the slots free, and the
// queued start goes on. Every job must run exactly once. Before, the nexlet's
// registration did not list the queued start: the next nexd took it for a start that
// never reached the nexlet and replayed it, the replay ran the job, and the original
// start, once it had a slot, found the job finished and ran it again (2 runs).
func TestReplayOfQueuedStartRunsOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const slow = 64 // the runner's slots for slow requests (nexlet.maxInFlight)
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	js, err := jetstream.New(nc, jetstream.WithDefaultTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(t.Context(), jetstream.ObjectStoreConfig{Bucket: "slowart"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := obs.PutBytes(t.Context(), "job_v1", []byte("#!/bin/sh\necho \"$3\" >> \"$2\"\n")); err != nil {
		t.Fatal(err)
	}
	// Every fetch of the bucket opens its own connection and first asks for the bucket's
	// stream: each is held there, one count per download begun.
	p := startDropProxy(t, s.ClientURL(), proxyRules{hold: func(subj string) bool {
		return strings.HasPrefix(subj, "$JS.API.") && strings.HasSuffix(subj, "OBJ_slowart")
	}})

	dir := t.TempDir()
	// READY waits for replayed workloads to run, bounded by startup_timeout: the held
	// ones do not run until the object store answers, which the test lets it do after.
	opts := nodeOpts{external: p.URL(), stateDir: dir, extra: []string{"--state", "kv", "--startup-timeout", "15s"}}
	n := startNode(t, opts)
	st := n.waitReady(t)
	n.waitNative(t)
	c := newCrashLoop(t, "replayrace")
	var deploys sync.WaitGroup
	t.Cleanup(deploys.Wait)
	// The deploys' requests end when nexd is killed: no answer comes from it.
	unanswered, cancelDeploys := context.WithCancel(context.Background())
	t.Cleanup(cancelDeploys)
	deploy := func(tag string, runRequest string) {
		t.Helper()
		m, err := nc.Request(protocol.AuctionSubject("default"), []byte(`{"agent_type":"native","auction_id":"`+tag+`","tags":{}}`), 30*time.Second)
		if err != nil {
			t.Fatalf("auction for %s: %v", tag, err)
		}
		var bid struct {
			BidderID string `json:"bidder_id"`
		}
		if err := json.Unmarshal(m.Data, &bid); err != nil || bid.BidderID == "" {
			t.Fatalf("auction for %s: %q", tag, m.Data)
		}
		body, _ := json.Marshal(map[string]any{"name": tag, "namespace": "default", "description": "replay race", "workload_type": "native",
			"workload_lifecycle": "job", "run_request": runRequest, "tags": map[string]string{}})
		deploys.Add(1)
		go func() {
			defer deploys.Done()
			_, _ = nc.RequestWithContext(unanswered, protocol.DeploySubject("default", bid.BidderID), body) // nexd dies before it answers
		}()
	}
	for i := range slow {
		tag := fmt.Sprintf("held-%d", i)
		deploy(tag, `{"uri":"nats://slowart/job:v1","argv":["`+c.marker+`","`+c.runsFile+`","`+tag+`"],"restart":{"policy":"never"}}`)
	}
	testkit.EventuallyWithin(t, 120*time.Second, "every slot's download held", func() bool { return p.held.Load() == slow })
	t.Logf("%d downloads held", slow)
	var before []string
	testkit.EventuallyWithin(t, 60*time.Second, "the held jobs' records", func() bool {
		var ok bool
		before, ok = nativeRecords(nc, st.NodeID)
		return ok && len(before) == slow
	})
	deploy("queued", `{"uri":"file:///bin/sh","argv":["-c","echo \"$2\" >> \"$1\"","`+c.marker+`","`+c.runsFile+`","queued"],"restart":{"policy":"never"}}`)
	var queued string
	testkit.EventuallyWithin(t, 60*time.Second, "the queued job's record", func() bool {
		ids, _ := nativeRecords(nc, st.NodeID)
		for _, id := range ids {
			if !slices.Contains(before, id) {
				queued = id
				return true
			}
		}
		return false
	})
	// The start leaves right after the record, on the local channel; nothing outside
	// tells when the nexlet read it. Killed before, the job is one whose start never
	// reached the nexlet (TestDeployKilledBeforeSendRunsOnce): once either way.
	time.Sleep(time.Second)

	n.signal(t, syscall.SIGKILL) // the nexlet outlives it, its starts in flight
	n.wait(t, 30*time.Second)
	cancelDeploys()
	t.Log("nexd killed")
	if got := c.runs(); got != 0 {
		t.Fatalf("%d runs while every slot's download was held", got)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the queued job's record there, unmarked, before the next nexd", func() bool {
		v, ok := kvValue(t, nc, st.NodeID, "native", queued) // not ok: not there, or the bucket did not answer
		return ok && !strings.Contains(string(v), `"nexd_started":true`)
	})

	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	// The adopted nexlet registers with the next nexd, which reconciles and replays the
	// jobs; READY once the replay is through (the held ones not running: at the bound).
	n2.waitReady(t)
	t.Log("the next nexd is ready; the object store answers again")
	p.releaseHeld()
	testkit.EventuallyWithin(t, 120*time.Second, "every job ran and left node state", func() bool {
		ids, ok := nativeRecords(nc, st.NodeID)
		return ok && len(ids) == 0 && strings.Count(runLines(c), "\n") >= slow+1
	})
	testkit.EventuallyWithin(t, 30*time.Second, "no process of the jobs left", func() bool { return len(markerPIDs(c.marker)) == 0 })
	runs := map[string]int{}
	for l := range strings.SplitSeq(strings.TrimSpace(runLines(c)), "\n") {
		runs[l]++
	}
	for tag, k := range runs {
		if k != 1 {
			t.Errorf("job %s ran %d times, want once", tag, k)
		}
	}
	if len(runs) != slow+1 || p.held.Load() != slow {
		t.Errorf("%d jobs ran from %d downloads, want %d jobs, %d downloads", len(runs), p.held.Load(), slow+1, slow)
	}
	if t.Failed() {
		t.Logf("runs: %v\nnexd:\n%s", runs, n2.out.String())
		return
	}
	t.Logf("queued job %s: 1 run; %d held jobs: 1 run each from %d downloads", queued, slow, p.held.Load())
}

// nativeRecords are the ids of the native workloads in node state; ok is false when
// the bucket did not answer (a loaded server: the caller asks again).
func nativeRecords(nc *nats.Conn, nodeID string) (ids []string, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, false
	}
	kv, err := js.KeyValue(ctx, "nex-"+nodeID)
	if err != nil {
		return nil, false
	}
	keys, err := kv.ListKeys(ctx)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, true
	}
	if err != nil {
		return nil, false
	}
	for k := range keys.Keys() {
		if id, ok := strings.CutPrefix(k, "native."); ok {
			ids = append(ids, id)
		}
	}
	return ids, ctx.Err() == nil
}

// runLines is what the jobs wrote to c's runs file: one line per run.
func runLines(c crashLoop) string {
	b, _ := os.ReadFile(c.runsFile)
	return string(b)
}
