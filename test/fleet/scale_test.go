package fleet

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// NodeIn adds a node (a nexd of its own, with its own state directory, control socket
// and cgroup root) that runs in host's network namespace: many nodes on one machine
// without a namespace each.
func (f *Fleet) NodeIn(host *Host, name string) *Host {
	f.t.Helper()
	h := &Host{f: f, N: len(f.Hosts) + 1, Name: name, NS: host.NS, IP: host.IP}
	h.Dir = filepath.Join(f.dir, name)
	h.StateDir = filepath.Join(h.Dir, "state")
	h.Socket = filepath.Join(h.Dir, "nexd.sock")
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err == nil {
		h.Cgroup = filepath.Join("/sys/fs/cgroup/memory", f.id+name)
	}
	if err := os.MkdirAll(h.StateDir, 0o700); err != nil {
		f.t.Fatal(err)
	}
	f.Hosts = append(f.Hosts, h)
	return h
}

// rssKiB is the resident memory of pid and its children (nexd and its nexlets).
func rssKiB(pid int) int {
	total := 0
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			total += n
		}
	}
	kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	for _, k := range strings.Fields(string(kids)) {
		if c, err := strconv.Atoi(k); err == nil {
			total += rssKiB(c)
		}
	}
	return total
}

// TestFleetScale: NEXD_FLEET_NODES nodes (make fleet-test-scale: 100) as processes on
// this machine, each a real nexd with its native nexlet, its own state directory,
// control socket and cgroup root, all on one nats-server (no JetStream: state in
// memory, which keeps a hundred nodes inside 2 cores). Node list, auctions, placements
// and lame duck by tag, each checked for complete answers and timed.
func TestFleetScale(t *testing.T) {
	n := intEnv(t, "NEXD_FLEET_NODES", 0)
	if n == 0 {
		t.Skip("the scale case runs with NEXD_FLEET_NODES=N (make fleet-test-scale runs 100)")
	}
	f := NewFleet(t, 1)
	fg := NewFigures(t, fmt.Sprintf("%d nodes on one machine", n))
	ns := f.Hosts[0]
	ns.natsConf = filepath.Join(ns.Dir, "nats.conf")
	testkit.WriteFile(t, ns.natsConf, fmt.Sprintf("server_name: scale\nlisten: %q\n", ns.IP+":4222"))
	ns.StartNATS()
	url := ns.URL()
	const racks = 10
	var nodes []*Host
	for i := 1; i <= n; i++ {
		nodes = append(nodes, f.NodeIn(ns, fmt.Sprintf("n%03d", i)))
	}
	// Start in batches, each node waited for: a hundred starting at once on 2 cores
	// would only measure the run queue.
	start := time.Now()
	const batch = 10
	for b := 0; b < n; b += batch {
		var wg sync.WaitGroup
		for i, h := range nodes[b:min(b+batch, n)] {
			rack := (b+i+1)%racks + 1
			h.f.start(h.Name+"-nexd", h.NS, bins.Path(t, "github.com/nexd-project/nexd/cmd/nexd"),
				"--state-dir", h.StateDir, "--control-socket", h.Socket, "--node-name", h.Name,
				"--startup-timeout", "120s", "--tags", fmt.Sprintf("host=%s,rack=r%d", h.Name, rack),
				"--nats.servers", url, "--cgroup-root", h.Cgroup)
			h.Nexd = f.procs[len(f.procs)-1]
			h.Nexd.nexd = true
			wg.Go(func() { h.WaitRunning(180 * time.Second) })
		}
		wg.Wait()
	}
	fg.Add("nodes started (batches of 10, each running)", fmt.Sprintf("%d in %v", n, time.Since(start).Round(100*time.Millisecond)))
	rss := 0
	for _, h := range nodes {
		rss += rssKiB(h.Nexd.cmd.Process.Pid)
	}
	fg.Add("resident memory, nexd + nexlet, all nodes / per node", fmt.Sprintf("%d MiB / %d MiB", rss/1024, rss/1024/n))
	time.Sleep(5 * time.Second) // settle: first heartbeats and health checks

	// Node list: complete with nexctl's default gather stall, and with a longer one.
	listed := func(extra ...string) (counts []int, times []time.Duration) {
		for range 5 {
			t0 := time.Now()
			out, errOut, code := ns.Ctl(url, append(extra, "--json", "--nats.timeout", "5s", "node", "list")...)
			times = append(times, time.Since(t0))
			var got []json.RawMessage
			if code != 0 || json.Unmarshal([]byte(out), &got) != nil {
				t.Logf("node list: exit %d: %s", code, errOut)
			}
			counts = append(counts, len(got))
		}
		return counts, times
	}
	counts, times := listed()
	fg.Add("node list (default --gather-stall 25ms): nodes / time, 5 runs", fmt.Sprintf("%v / p50 %v max %v", counts, percentile(times, 50), percentile(times, 100)))
	slowCounts, slowTimes := listed("--gather-stall", "250ms")
	fg.Add("node list (--gather-stall 250ms): nodes / time, 5 runs", fmt.Sprintf("%v / p50 %v max %v", slowCounts, percentile(slowTimes, 50), percentile(slowTimes, 100)))

	// Auctions, from a client in the namespace: every node bids (each has a healthy
	// native nexlet and matches no-tag auctions).
	nc, err := nats.Connect(url, nats.SetCustomDialer(nsDialer{ns.NS}))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	auction := func(tags map[string]string) (bidders []string, last time.Duration) {
		inbox := nats.NewInbox()
		sub, err := nc.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		data, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: nuid.Next(), Tags: tags})
		t0 := time.Now()
		if err := nc.PublishRequest(protocol.AuctionSubject("system"), inbox, data); err != nil {
			t.Fatal(err)
		}
		for len(bidders) < n {
			m, err := sub.NextMsg(5*time.Second - time.Since(t0))
			if err != nil {
				break
			}
			var b protocol.AuctionResponse
			if json.Unmarshal(m.Data, &b) == nil {
				bidders = append(bidders, b.NodeName)
			}
			last = time.Since(t0)
		}
		return bidders, last
	}
	complete := 0
	var lastBid []time.Duration
	const auctions = 20
	for range auctions {
		b, last := auction(map[string]string{})
		if len(b) == n {
			complete++
		}
		lastBid = append(lastBid, last)
	}
	fg.Add("auctions with a bid from every node (in 5s)", fmt.Sprintf("%d of %d", complete, auctions))
	fg.Add("time to the last bid p50 / p99", fmt.Sprintf("%v / %v", percentile(lastBid, 50), percentile(lastBid, 99)))

	// Placements through nexctl (auction, then deploy to the least loaded bidder).
	var placed []time.Duration
	onNodes := map[string]bool{}
	failed := 0
	for i := range 10 {
		t0 := time.Now()
		out, errOut, code := ns.Ctl(url, "--json", "--nats.timeout", "5s", "workload", "run", "--name", fmt.Sprintf("s%d", i), "--", "/bin/sleep", "3600")
		var d Deployed
		if code != 0 || json.Unmarshal([]byte(out), &d) != nil || d.ID == "" {
			failed++
			t.Logf("deploy at scale: exit %d: %s %s", code, out, errOut)
			continue
		}
		took := time.Since(t0)
		if took > 5*time.Second {
			t.Logf("slow placement (%v) on %s: %s", took, d.Node, strings.TrimSpace(errOut))
		}
		placed = append(placed, took)
		onNodes[d.Node] = true
	}
	fg.Add("placements ok/failed, distinct nodes", fmt.Sprintf("%d/%d, %d", len(placed), failed, len(onNodes)))
	fg.Add("placement p50 / p99 (whole nexctl workload run)", fmt.Sprintf("%v / %v", percentile(placed, 50), percentile(placed, 99)))

	// Lame duck by tag: exactly the rack's nodes, and no more bids from them.
	rackNodes := map[string]bool{}
	for i, h := range nodes {
		if (i+1)%racks+1 == 3 {
			rackNodes[h.Name] = true
		}
	}
	t0 := time.Now()
	out, errOut, code := ns.Ctl(url, "--json", "--nats.timeout", "5s", "node", "lameduck", "--tag", "rack=r3", "--delay", "10m")
	took := time.Since(t0)
	var results []struct {
		NodeID  string `json:"node_id"`
		Success bool   `json:"success"`
	}
	_ = json.Unmarshal([]byte(out), &results)
	ok := 0
	for _, r := range results {
		if r.Success {
			ok++
		}
	}
	fg.Add("lameduck --tag rack=r3: nodes commanded / time", fmt.Sprintf("%d of %d / %v (exit %d)", ok, len(rackNodes), took.Round(time.Millisecond), code))
	if code != 0 {
		t.Errorf("nexctl node lameduck --tag: exit %d: %s", code, errOut)
	}
	var inLameduck, wrong []string
	for _, h := range nodes {
		st, err := h.Status()
		if err != nil {
			t.Errorf("%s: %v", h.Name, err)
			continue
		}
		if st.State == "lameduck" {
			inLameduck = append(inLameduck, h.Name)
			if !rackNodes[h.Name] {
				wrong = append(wrong, h.Name)
			}
		}
	}
	fg.Add("nodes in lame duck (control sockets) / outside rack r3", fmt.Sprintf("%d / %d", len(inLameduck), len(wrong)))
	bidders, _ := auction(map[string]string{})
	fromRack := slices.ContainsFunc(bidders, func(b string) bool { return rackNodes[b] })
	fg.Add("bids in an auction after the lame duck", fmt.Sprintf("%d (want %d), from rack r3: %v", len(bidders), n-len(rackNodes), fromRack))

	if slices.Min(slowCounts) != n || complete < auctions || failed > 0 || len(inLameduck) != len(rackNodes) || len(wrong) > 0 || fromRack {
		t.Fatalf("incomplete at %d nodes: node lists %v, %d of %d auctions complete, %d placements failed, lame duck %v (wrong %v), rack bids %v",
			n, slowCounts, complete, auctions, failed, inLameduck, wrong, fromRack)
	}
}
