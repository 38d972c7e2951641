package e2e

import (
	"encoding/json"
	"fmt"
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
// and restarted by nexd; from its registration on, for 1.5 s (its replay takes 0.2-0.3
// s), the node's workload list (WPING, the 2 s QUERYWORKLOADS fan-out) is asked again
// and again. Every answer must be whole (no Nex-Partial) and list all 100, or be
// partial only once the node's bound has passed: the node waits for a nexlet that
// registered and does not serve yet, and the nexlet lists the
// workloads it has not replayed yet as starting. Before, the first lists came back
// partial within milliseconds (no subscriber yet), then whole but short. The nexlet
// takes its replay set late (NEXD_TEST_HOLD=replay-late, 0.3 s): before, it served and
// sent its first heartbeat, which lets the node's lists go ahead, before it took the
// set, and lists in that window came back whole with 0 rows (once in a fresh-clone CI
// run, under load, without the hold; with it, every run). The node's wait is bounded
// (its 2 s fan-out): on a machine so loaded that the restarted nexlet, busy with its
// replay, does not answer within it, a list comes back partial after the bound, which
// is the node's answer, not the bug.
func TestListDuringReplayIsWhole(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.ReplayLate}})
	n.waitReady(t)
	const services = 100
	marker := fmt.Sprintf("nexd-e2e-replaylist-%d", time.Now().UnixNano())
	n.runWorkloads(t, services, func(i int) []string {
		return []string{"--bids", "1", "--name", fmt.Sprintf("s%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	})
	nc := testnats.Connect(t, s)
	list := func() (rows int, partial string, took time.Duration) {
		body, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})
		start := time.Now()
		m, err := nc.RequestMsg(&nats.Msg{Subject: protocol.WPingSubject(protocol.SystemNamespace), Data: body}, 10*time.Second)
		if err != nil {
			t.Fatalf("list: %v", err)
		}
		var ws []protocol.WorkloadSummary
		if err := json.Unmarshal(m.Data, &ws); err != nil {
			t.Fatalf("list: %q: %v", m.Data, err)
		}
		return len(ws), m.Header.Get(protocol.HeaderPartial), time.Since(start)
	}
	testkit.EventuallyWithin(t, 120*time.Second, "every service listed", func() bool {
		r, p, _ := list()
		return r == services && p == ""
	})
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// From the new nexlet's registration on (while it is dead the list is partial).
	testkit.EventuallyWithin(t, 60*time.Second, "the new native nexlet registered", func() bool {
		return strings.Contains(n.out.String(), fmt.Sprintf("replayed=%d", services))
	})
	// Lists for 1.5 s from the registration on: the replay of 100 takes 0.2-0.3 s here.
	// The node waits for the nexlet for its fan-out's whole bound (2 s), no longer: a
	// list that came back partial only after the bound had passed (the nexlet did not
	// answer within it: 6.8 s for one list at load 50, -race, 2 cores) is the node's
	// documented answer and is logged; one partial before the bound (the node did not wait: the
	// bug, partial in milliseconds) or whole but short fails.
	const fanoutBound = 2 * time.Second
	early, late, short, asked := 0, 0, 0, 0
	since := time.Now()
	for time.Since(since) < 1500*time.Millisecond {
		r, p, took := list()
		asked++
		t.Logf("list %d at +%v: %d rows in %v, partial %t", asked, time.Since(since).Round(time.Millisecond), r, took.Round(time.Millisecond), p != "")
		switch {
		case p != "" && took < fanoutBound:
			early++
		case p != "":
			late++
		case r != services:
			short++
		}
	}
	if late > 0 {
		t.Logf("%d of %d lists came back partial after the node's %v bound: the restarted nexlet did not answer within it on this machine", late, asked, fanoutBound)
	}
	if early > 0 || short > 0 {
		t.Errorf("of %d lists asked as the restarted nexlet replayed %d services, %d were partial before the node's %v bound and %d whole but short", asked, services, early, fanoutBound, short)
	}
}
