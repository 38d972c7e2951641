package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestListDuringReplayIsWhole: the native nexlet holding 100 services is killed (-9)
// and restarted by nexd, and the node's workload list (WPING, the 2 s QUERYWORKLOADS
// fan-out) is asked while the restarted nexlet is held at two points of its replay,
// each until the test releases it (testhold.ReplayLate, ReplayHeld): registered and
// not serving yet, its replay set not taken (before, the nexlet served and heartbeat
// before it took the set, and lists there came back whole with 0 rows); and serving,
// its replay not begun. Every answer must be whole (no Nex-Partial) and list all 100,
// or be partial only once the node's bound has passed: the node waits for a nexlet
// that registered and does not serve yet (before, lists came back partial within
// milliseconds: no subscriber yet), and the nexlet lists the workloads it has not
// replayed yet as starting (before, whole but short). A round proves its case only if
// its first list met the node waiting for the held nexlet (the node's debug line) and
// the lists of the held replay listed every service as replaying; one that did not
// (the node's bound passed first on a loaded machine: the node's documented answer,
// logged) is tried again, at most replayRounds times, then the test fails.
func TestListDuringReplayIsWhole(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	release := t.TempDir()
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv", "--logger.level", "debug"},
		env: []string{testhold.Env + "=" + testhold.ReplayLate + "," + testhold.ReplayHeld + "," + testhold.ReleaseIn(release)}})
	n.waitReady(t)
	const services = 100
	marker := fmt.Sprintf("nexd-e2e-replaylist-%d", time.Now().UnixNano())
	n.runWorkloads(t, services, func(i int) []string {
		return []string{"--bids", "1", "--name", fmt.Sprintf("s%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	})
	nc := testnats.Connect(t, s)
	l := replayLister{t: t, nc: nc, services: services}
	testkit.EventuallyWithin(t, 120*time.Second, "every service listed", func() bool {
		r := l.list()
		return len(r.rows) == services && r.partial == "" && r.replaying() == 0
	})
	const replayRounds = 3
	for round := 1; round <= replayRounds; round++ {
		if l.round(n, release, round) {
			return
		}
		testkit.EventuallyWithin(t, 120*time.Second, "every service listed, replayed", func() bool {
			r := l.list()
			return len(r.rows) == services && r.partial == "" && r.replaying() == 0
		})
	}
	t.Fatalf("in none of %d rounds did the lists meet the restarted nexlet held before it served and during its replay", replayRounds)
}

// replayLister asks the node's workload list for TestListDuringReplayIsWhole.
type replayLister struct {
	t        *testing.T
	nc       *nats.Conn
	services int
}

// fanoutBound is the node's QUERYWORKLOADS fan-out bound: a list partial only past it
// is the node's answer, not the bug.
const fanoutBound = 2 * time.Second

type listed struct {
	rows    []protocol.WorkloadSummary
	partial string
	took    time.Duration
}

// replaying counts the rows listed as replaying (not replayed yet).
func (r listed) replaying() int {
	c := 0
	for _, w := range r.rows {
		if w.Metadata["replaying"] == "true" {
			c++
		}
	}
	return c
}

func (l replayLister) list() listed {
	body, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})
	start := time.Now()
	m, err := l.nc.RequestMsg(&nats.Msg{Subject: protocol.WPingSubject(protocol.SystemNamespace), Data: body}, 10*time.Second)
	if err != nil {
		l.t.Errorf("list: %v", err)
		return listed{partial: err.Error(), took: time.Since(start)}
	}
	var ws []protocol.WorkloadSummary
	if err := json.Unmarshal(m.Data, &ws); err != nil {
		l.t.Errorf("list: %q: %v", m.Data, err)
	}
	return listed{rows: ws, partial: m.Header.Get(protocol.HeaderPartial), took: time.Since(start)}
}

// judge fails a list that is partial before the node's bound (the node did not wait)
// or whole but short, and reports whether it was whole (false: partial past the
// node's bound, its documented answer).
func (l replayLister) judge(what string, r listed) bool {
	l.t.Logf("%s: %d rows (%d replaying) in %v, partial %q", what, len(r.rows), r.replaying(), r.took.Round(time.Millisecond), r.partial)
	switch {
	case r.partial != "" && r.took < fanoutBound:
		l.t.Fatalf("%s: partial after %v, before the node's %v bound: %s", what, r.took, fanoutBound, r.partial)
	case r.partial != "":
		return false
	case len(r.rows) != l.services:
		l.t.Fatalf("%s: whole but %d of %d rows", what, len(r.rows), l.services)
	}
	return true
}

// round kills the native nexlet and lists while its successor is held before it serves
// (its replay set not taken) and then before its replay, each released by the test,
// and reports whether the lists proved the case (see TestListDuringReplayIsWhole).
func (l replayLister) round(n *node, release string, round int) bool {
	t := l.t
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	// A release the last round's nexlet did not take (its hold's bound passed) is not this one's.
	for _, point := range []string{testhold.ReplayLate, testhold.ReplayHeld} {
		_ = os.Remove(filepath.Join(release, point))
	}
	from := len(n.out.String())
	since := func(s string) bool { return strings.Contains(n.out.String()[from:], s) }
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the new native nexlet registered, held before its replay set", func() bool {
		return since("test hold: the replay set is taken late until released")
	})
	// Asked while the nexlet is held registered, not serving: the node must wait for it.
	// Released once the node says it waits (the list met the held nexlet), not before.
	got := make(chan listed, 1)
	go func() { got <- l.list() }()
	var first listed
	waited := false
	testkit.EventuallyWithin(t, 60*time.Second, "the node waiting for the held nexlet, or the list's answer", func() bool {
		if since("a list waits for a nexlet registered and not serving yet") {
			waited = true
			return true
		}
		select {
		case first = <-got:
			return true
		default:
			return false
		}
	})
	if !waited {
		// The nexlet is held, not serving: an answer now is the node's without it.
		l.judge(fmt.Sprintf("round %d: list asked while the nexlet was held not serving, answered before the node waited", round), first)
		t.Fatalf("round %d: the list was answered while the restarted nexlet was held registered and not serving, and the node never waited for it", round)
	}
	if err := testhold.Release(release, testhold.ReplayLate); err != nil {
		t.Fatal(err)
	}
	first = <-got
	served := l.judge(fmt.Sprintf("round %d: list asked while the nexlet was held not serving", round), first)
	if !served {
		if !since("a list waited its bound for a nexlet not serving yet") {
			t.Fatalf("round %d: the list came back partial past the node's bound, yet the node did not say its wait for the nexlet passed its bound", round)
		}
		t.Logf("round %d: the node's wait for the held nexlet passed its bound before the release took effect: not proved", round)
	}
	// Asked while the nexlet serves and holds its replay: every service is replaying.
	testkit.EventuallyWithin(t, 60*time.Second, "the restarted nexlet holding its replay", func() bool {
		return since("test hold: the replay is held until released")
	})
	const asks = 3
	replayed := true
	for i := 1; i <= asks; i++ {
		r := l.list()
		if !l.judge(fmt.Sprintf("round %d: list %d of %d asked during the held replay", round, i, asks), r) || r.replaying() != l.services {
			replayed = false // partial past the bound, or the hold's bound passed: not proved
		}
	}
	if err := testhold.Release(release, testhold.ReplayHeld); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the held replay going on", func() bool {
		return since("test hold: the replay goes on") && strings.Count(n.out.String()[from:], "test hold: the replay goes on") >= 2
	})
	if !replayed {
		t.Logf("round %d: not every list during the held replay was whole with every service replaying: not proved", round)
	}
	return served && replayed
}
