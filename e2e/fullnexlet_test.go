package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet/native"
)

// TestFullNexletStaleHeartbeat: a real native nexlet at max_workloads 1 whose
// heartbeat, taken with nothing running, reaches the node only after a deploy to it was
// kept (NEXD_TEST_HOLD=heartbeat-late: each periodic heartbeat is published 4 s after
// it was taken, as a heartbeat and a start's answer may pass each other on a loaded
// node). The node must not take that heartbeat's count for the truth: it bids on no
// further auction for that type (counted as not bid for max_workloads) and starts
// nothing more on the nexlet. Before 269f0de and 9be889b such a heartbeat reset the
// count, the node bid again, and the deploy it won reached the nexlet, which refused it
// only because it checks its own max. The node-level tests (daemon/node
// TestHeartbeatKeepsStartInFlight, TestStaleHeartbeatAfterStart) drive the same race
// with the node package's test nexlet.
func TestFullNexletStaleHeartbeat(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	// The native nexlet started from agents (named "native": nexd gives it what it gives
	// its own, local channel included) with its max in its own environment (the
	// agents route; TestFullNexletNoBidSaysMaxWorkloads takes native_max_workloads).
	bin := filepath.Join(t.TempDir(), "native")
	if err := os.Symlink(nexdBin(t), bin); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOpts{env: []string{testhold.Env + "=" + testhold.HeartbeatLate},
		extra: []string{"--disable-native-start", "--agents.uri", "file://" + bin,
			"--agents.argv", "nexlet", "--agents.argv", "native", "--agents.env", native.EnvMaxWorkloads + "=1"}})
	n.waitReady(t)
	n.waitNative(t)

	taken := regexp.MustCompile(`test hold: heartbeat taken, published late.*\bworkload_count=(\d+)`)
	published := func() int { return strings.Count(n.out.String(), "test hold: late heartbeat published") }
	// Each round waits for a heartbeat taken with nothing running, then deploys within
	// its hold. A deploy that outlasts the hold (a loaded machine) proves nothing: its
	// workload is stopped and the next heartbeat tried.
	var first string
	for round := 1; first == ""; round++ {
		if round > 4 {
			t.Fatalf("in %d rounds no deploy was kept within a heartbeat's %s hold\n%s", round-1, testhold.HeartbeatLateBy, n.out.String())
		}
		before := len(taken.FindAllString(n.out.String(), -1))
		var count string
		testkit.EventuallyWithin(t, 30*time.Second, "a heartbeat taken", func() bool {
			all := taken.FindAllStringSubmatch(n.out.String(), -1)
			if len(all) <= before {
				return false
			}
			count = all[len(all)-1][1]
			return true
		})
		if count != "0" {
			t.Fatalf("a heartbeat taken with %s workloads running, want 0", count)
		}
		pub := published()
		beat := n.native(t).LastHeartbeat
		deployed := time.Now()
		r := n.runWorkload(t, "--name", "first", "--", "/bin/sleep", "600")
		if published() > pub {
			t.Logf("round %d: the deploy (%s) outlasted the heartbeat's hold; again", round, time.Since(deployed).Round(time.Millisecond))
			n.mustCtl(t, "workload", "stop", r.ID)
			continue
		}
		first = r.ID
		// The stale heartbeat (0 workloads) handled by the node: its time moves on.
		testkit.EventuallyWithin(t, 30*time.Second, "the late heartbeat handled", func() bool {
			now := n.native(t).LastHeartbeat
			return now != nil && (beat == nil || now.After(*beat))
		})
		// The nexlet's log line comes through nexd's relay and may follow the heartbeat
		// itself (CI at load 40: 0 counted when the node had handled it); the next
		// heartbeat is taken no sooner than the hold after.
		testkit.EventuallyWithin(t, testhold.HeartbeatLateBy, "the late heartbeat's log line", func() bool { return published() > pub })
		if published() != pub+1 {
			t.Fatalf("%d heartbeats published since the deploy, want the one taken before it", published()-pub)
		}
	}

	// Full: an auction gets no bid, and nothing more is started on the nexlet.
	out, errOut, code := n.ctl(t, "workload", "run", "--name", "second", "--", "/bin/sleep", "600")
	t.Logf("second deploy: exit %d: %s", code, strings.TrimSpace(errOut))
	if code == 0 || !strings.Contains(errOut, "no bids") {
		t.Errorf("a deploy to the full nexlet after a stale heartbeat: exit %d\n%s%s\nwant no bids", code, out, errOut)
	}
	if strings.Contains(n.out.String(), "already runs its maximum") {
		t.Errorf("the node sent the full nexlet a start (it refused it itself):\n%s", n.out.String())
	}
	notBid := regexp.MustCompile(`nexd_auctions_not_bid_total\{reason="max_workloads"\} (\d+)`)
	m := notBid.FindStringSubmatch(n.mustCtl(t, "metrics"))
	if m == nil {
		t.Error("no auction counted as not bid for max_workloads")
	} else if c, _ := strconv.Atoi(m[1]); c < 1 {
		t.Errorf("%d auctions counted as not bid for max_workloads, want 1", c)
	}
	running := 0
	for _, w := range n.workloads(t) {
		if w.ID != first && w.State != "stopped" {
			t.Errorf("a second workload on the full nexlet: %+v", w)
		}
		if w.State == "running" {
			running++
		}
	}
	if running > 1 {
		t.Errorf("%d workloads running on a nexlet whose max is 1", running)
	}
}

// TestFullNexletNoBidSaysMaxWorkloads: a deploy that gets no bid because the node's
// built-in native nexlet is at its max_workloads (native_max_workloads 1) says so, naming the node, the nexlet and
// its count, from the node's info (nexd_max_workloads); before, nexctl said the bid
// was likely lost to an auction flood, asked again for 20 s, and then that no node had
// a healthy native nexlet.
func TestFullNexletNoBidSaysMaxWorkloads(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{extra: []string{"--native-max-workloads", "1"}})
	id := n.waitReady(t).NodeID
	n.waitNative(t)
	n.runWorkload(t, "--name", "first", "--", "/bin/sleep", "600")

	var info struct {
		Summaries []struct {
			MaxWorkloads int `json:"nexd_max_workloads"`
		} `json:"node_agent_summaries"`
	}
	if err := json.Unmarshal([]byte(n.mustCtl(t, "node", "info", id, "--json")), &info); err != nil ||
		len(info.Summaries) != 1 || info.Summaries[0].MaxWorkloads != 1 {
		t.Fatalf("node info: %v, %+v; want one nexlet with nexd_max_workloads 1", err, info)
	}
	// The table says it too (before, only --json did).
	if out := n.mustCtl(t, "node", "info", id); !strings.Contains(out, "│ 1 (max 1: full) ") {
		t.Errorf("node info's table does not show the nexlet full at its max_workloads:\n%s", out)
	}
	start := time.Now()
	out, errOut, code := n.ctl(t, "workload", "run", "--name", "second", "--", "/bin/sleep", "600")
	took := time.Since(start)
	t.Logf("second deploy: exit %d after %v: %s", code, took.Round(time.Millisecond), strings.TrimSpace(errOut))
	want := `no bids for a native workload in namespace system: node ` + id + `'s native nexlet "go_exec" is at its max_workloads (1 of 1 workloads)`
	if code == 0 || !strings.Contains(errOut, want) {
		t.Errorf("a deploy to the full nexlet: exit %d\n%s%s\nwant %q", code, out, errOut, want)
	}
	for _, wrong := range []string{"auction flood", "asking again", "no node has a healthy nexlet"} {
		if strings.Contains(errOut, wrong) {
			t.Errorf("the no-bid message says %q:\n%s", wrong, errOut)
		}
	}
}
