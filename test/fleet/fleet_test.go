package fleet

import (
	"encoding/json"
	"fmt"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"github.com/nexd-project/nexd/protocol"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// startCluster is topology (a): three hosts, one JetStream cluster across them, each
// nexd connected to its own host's server first and the others as fallbacks.
func startCluster(t *testing.T, n int) *Fleet {
	f := NewFleet(t, n)
	f.StartClusterNATS()
	for _, h := range f.Hosts {
		h.StartNexd(h.ClusterURLs())
	}
	h1 := f.Hosts[0]
	testkit.EventuallyWithin(t, 60*time.Second, "every node in node list", func() bool {
		return len(h1.NodeNames(h1.ClusterURLs())) == n
	})
	return f
}

func TestFleetSmoke(t *testing.T) {
	f := startCluster(t, 3)
	h1 := f.Hosts[0]
	names := h1.NodeNames(h1.ClusterURLs())
	slices.Sort(names)
	t.Logf("nodes: %v", names)
	d, err := h1.Deploy(h1.ClusterURLs(), "smoke")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("deployed %+v", d)
}

// deployLog is what a continuous deployer saw.
type deployLog struct {
	at   time.Time
	took time.Duration
	d    Deployed
	err  error
}

// deployContinuously deploys through from (to servers) one workload after another
// until stop is closed or max deploys were tried, and returns every outcome.
func deployContinuously(from *Host, servers, prefix string, max int, pause time.Duration, stop <-chan struct{}) []deployLog {
	var log []deployLog
	for i := range max {
		select {
		case <-stop:
			return log
		default:
		}
		t0 := time.Now()
		d, err := from.Deploy(servers, fmt.Sprintf("%s%d", prefix, i))
		log = append(log, deployLog{at: time.Now(), took: time.Since(t0), d: d, err: err})
		time.Sleep(pause)
	}
	return log
}

// TestFleetNATSServerKilled: three hosts, one JetStream cluster, an R3 state bucket
// per node (state_replicas auto). While a client deploys continuously, the nats-server
// of host 3 is killed (-9). Figures: deploys that failed during the failover, time
// until deploys succeed again, workloads lost (must be 0), state entries missing
// from the KV buckets (must be 0).
func TestFleetNATSServerKilled(t *testing.T) {
	before := durationEnv(t, "NEXD_FLEET_BEFORE", 8*time.Second)
	after := durationEnv(t, "NEXD_FLEET_AFTER", 30*time.Second)
	f := startCluster(t, 3)
	fg := NewFigures(t, "kill one of three NATS servers while deploying")
	h1, h3 := f.Hosts[0], f.Hosts[2]
	var waited []string
	for _, h := range f.Hosts {
		line := h.Nexd.LogLine("workload state bucket", "wanted=")
		if !strings.Contains(line, "replicas=3") {
			t.Fatalf("%s: state bucket not R3 with 3 servers: %q", h.Name, line)
		}
		fg.Add(h.Name+" state bucket", line[strings.Index(line, "replicas="):])
		// The cluster boots with the nodes: a node may ask for R3 before JetStream
		// knows three servers, and waits (it used to exit).
		if h.Nexd.LogLine("JetStream cannot place the state bucket yet") != "" {
			waited = append(waited, h.Name)
		}
	}
	fg.Add("nodes that waited for the cluster to place their bucket", fmt.Sprint(waited))
	// nexd --check with the same settings tells what it asks for and what the bucket has.
	check := h1.NexdCheck(h1.ClusterURLs())
	fg.Add("h1's nexd --check", strings.Join(check, " | "))
	if !slices.ContainsFunc(check, func(l string) bool { return strings.Contains(l, "asks for 3 replicas") }) ||
		!slices.ContainsFunc(check, func(l string) bool { return strings.HasSuffix(l, "has 3 replicas") }) {
		t.Errorf("nexd --check on h1 does not say it asks for 3 replicas and the bucket has 3: %q", check)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var log []deployLog
	wg.Go(func() { log = deployContinuously(h1, h1.ClusterURLs(), "w", 400, 200*time.Millisecond, stop) })
	time.Sleep(before)
	killedAt := time.Now()
	h3.NATS.Kill()
	time.Sleep(after)
	close(stop)
	wg.Wait()

	var okBefore, okAfter, failed int
	var firstOKAfter, lastFail time.Time
	var failures []string
	deployed := map[string]string{}
	for _, l := range log {
		switch {
		case l.err != nil:
			failed++
			lastFail = l.at
			failures = append(failures, fmt.Sprintf("+%v %v", l.at.Sub(killedAt).Round(time.Millisecond), l.err))
		case l.at.Before(killedAt):
			okBefore++
			deployed[l.d.ID] = l.d.Node
		default:
			okAfter++
			deployed[l.d.ID] = l.d.Node
			if firstOKAfter.IsZero() {
				firstOKAfter = l.at
			}
		}
	}
	fg.Add("deploys before the kill (ok)", okBefore)
	fg.Add("deploys after the kill (ok)", okAfter)
	fg.Add("deploys failed", failed)
	for _, s := range failures {
		t.Logf("failed deploy %s", s)
	}
	if !firstOKAfter.IsZero() {
		fg.Add("first successful deploy after the kill", "+"+firstOKAfter.Sub(killedAt).Round(time.Millisecond).String())
	}
	if !lastFail.IsZero() {
		fg.Add("last failed deploy", "+"+lastFail.Sub(killedAt).Round(time.Millisecond).String())
	}
	if okAfter == 0 {
		t.Fatalf("no deploy succeeded in the %v after the kill", after)
	}

	// Zero lost: every workload a deploy reported started still runs, exactly once.
	var running map[string][]string
	testkit.EventuallyWithin(t, 30*time.Second, "every deployed workload running", func() bool {
		running = f.Running()
		for id := range deployed {
			if len(running[id]) != 1 {
				return false
			}
		}
		return true
	})
	lost, dup := 0, 0
	for id := range deployed {
		switch n := len(running[id]); {
		case n == 0:
			lost++
		case n > 1:
			dup++
		}
	}
	fg.Add("workloads deployed / running", fmt.Sprintf("%d / %d", len(deployed), len(running)))
	fg.Add("workloads lost", lost)
	fg.Add("workloads duplicated", dup)

	// KV intact: each running workload has its entry in its node's (R3) bucket, read
	// through the two surviving servers.
	missing := 0
	servers := f.Hosts[0].URL() + "," + f.Hosts[1].URL()
	for _, h := range f.Hosts {
		st, err := h.Status()
		if err != nil {
			t.Fatal(err)
		}
		keys, err := h1.StateKeys(servers, st.NodeID)
		if err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
		ws, err := h.Workloads()
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range ws {
			if !slices.ContainsFunc(keys, func(k string) bool { return strings.Contains(k, w.ID) }) {
				missing++
				t.Errorf("%s: workload %s has no entry in its state bucket (keys %v)", h.Name, w.ID, keys)
			}
		}
	}
	fg.Add("state entries missing from the KV buckets", missing)
	if st, err := h3.Status(); err == nil {
		fg.Add("h3's nexd now connected to", fmt.Sprintf("%s (connected %v, reconnects %d)", st.NATS.Server, st.NATS.Connected, st.NATS.Reconnects))
	}
	if lost > 0 || dup > 0 {
		t.Fatalf("%d workloads lost, %d duplicated", lost, dup)
	}
}

func durationEnv(t *testing.T, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return d
}

// TestFleetPartition: five hosts, one JetStream cluster. Host 5's link is pulled at
// the switch for NEXD_FLEET_PARTITION (default 30s; the figure is 60s) while a
// client on host 1 keeps deploying through the majority's servers. Figures:
// placements/s on the majority side, placements on the unreachable node (must be 0),
// host 5's workloads still running during the partition, what its STATUS, nexctl
// status and metrics say about the lost cluster, duplicates after healing (must be 0),
// and the time until node list shows host 5 again. NEXD_FLEET_HOSTS changes the size.
func TestFleetPartition(t *testing.T) {
	n := intEnv(t, "NEXD_FLEET_HOSTS", 5)
	partitionCase(t, n, []int{n})
}

// TestFleetSplit: five hosts split 2|3 (hosts 4 and 5 moved to a bridge of their own,
// so they still reach each other but not the other three) for NEXD_FLEET_PARTITION.
// The same figures as TestFleetPartition, for a minority of two.
func TestFleetSplit(t *testing.T) {
	partitionCase(t, 5, []int{4, 5})
}

func intEnv(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

// partitionCase cuts the hosts numbered cut (1-based) off the others for
// NEXD_FLEET_PARTITION: one host by pulling its link, several by moving them onto a
// bridge of their own.
func partitionCase(t *testing.T, n int, cut []int) {
	partition := durationEnv(t, "NEXD_FLEET_PARTITION", 30*time.Second)
	f := startCluster(t, n)
	var minority, majority []*Host
	for _, h := range f.Hosts {
		if slices.Contains(cut, h.N) {
			minority = append(minority, h)
		} else {
			majority = append(majority, h)
		}
	}
	var minNames []string
	for _, h := range minority {
		minNames = append(minNames, h.Name)
	}
	fg := NewFigures(t, fmt.Sprintf("partition %v off %d hosts for %v", minNames, n, partition))
	h1, hx := f.Hosts[0], minority[0]
	var majURLs []string
	for _, h := range majority {
		majURLs = append(majURLs, h.URL())
	}
	majorityURLs := strings.Join(majURLs, ",")
	minorityIDs := map[string]string{}
	for _, h := range minority {
		st, err := h.Status()
		if err != nil {
			t.Fatal(err)
		}
		minorityIDs[st.NodeID] = h.Name
	}
	// Two workloads on each host before the partition.
	pre := map[string]string{}
	for _, h := range f.Hosts {
		for i := range 2 {
			d, err := h1.Deploy(h1.ClusterURLs(), fmt.Sprintf("pre-%s-%d", h.Name, i), "--tags", "host="+h.Name)
			if err != nil {
				t.Fatal(err)
			}
			pre[d.ID] = h.Name
		}
	}
	for _, h := range f.Hosts {
		if st, err := h.Status(); err == nil {
			fg.Add(h.Name+"'s nexd connected to before the cut", st.NATS.Server)
		}
	}
	if js := jsState(hx); js != "ok" {
		t.Logf("%s's JetStream before the cut: %s", hx.Name, js)
	}
	if len(minority) == 1 {
		hx.LinkDown()
	} else {
		f.Split(minority)
	}
	cutAt := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var log []deployLog
	wg.Go(func() { log = deployContinuously(h1, majorityURLs, "p", 1000, 100*time.Millisecond, stop) })
	// Meanwhile the cut-off host keeps its workloads and answers its control socket,
	// and says it lost its cluster.
	var seenStatus, firstChange, jsSeen string
	statusOK, statusFail := 0, 0
	beforeX, _ := hx.Status()
	for time.Since(cutAt) < partition {
		st, err := hx.Status()
		if err != nil {
			statusFail++
		} else {
			statusOK++
			seenStatus = fmt.Sprintf("state %s, nats %s connected=%v reconnects=%d", st.State, st.NATS.Server, st.NATS.Connected, st.NATS.Reconnects)
			if js := st.NATS.JetStream; js != nil {
				seenStatus += ", jetstream " + js.State
				if jsSeen == "" && js.State != "ok" {
					jsSeen = fmt.Sprintf("+%v: %s: %s", time.Since(cutAt).Round(100*time.Millisecond), js.State, js.Detail)
				}
			}
			if firstChange == "" && (!st.NATS.Connected || st.NATS.Reconnects != beforeX.NATS.Reconnects) {
				firstChange = fmt.Sprintf("+%v: %s", time.Since(cutAt).Round(100*time.Millisecond), seenStatus)
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	// A short partition (CI's 15 s) may end before the node has noticed (pings and
	// Raft time-outs, then a 5 s probe and a 5 s STATUS= round): the cut lasts until it
	// has, at most 30 s more.
	testkit.WaitFor(30*time.Second, func() bool {
		st, err := hx.Status()
		if err != nil || st.NATS.JetStream == nil || st.NATS.JetStream.State == "ok" {
			return false
		}
		if jsSeen == "" {
			jsSeen = fmt.Sprintf("+%v: %s: %s", time.Since(cutAt).Round(100*time.Millisecond), st.NATS.JetStream.State, st.NATS.JetStream.Detail)
		}
		n, _ := hx.NotifyStatusSince(cutAt, "jetstream unavailable")
		return len(minority) > 1 || n != ""
	})
	ctlStatus, _, _ := hx.CtlLocal("status")
	jsMetrics := hx.Metrics("nexd_jetstream_state")
	var majJS []string
	for _, h := range majority {
		majJS = append(majJS, h.Name+" "+jsState(h))
	}
	// Running means processes in the workload's cgroup: what the kernel says, whether
	// or not the node can reach its nexlet over NATS to ask.
	runningX, preX := 0, 0
	for id, host := range pre {
		for _, h := range minority {
			if host == h.Name {
				preX++
				if len(h.WorkloadPIDs(id)) > 0 {
					runningX++
				}
			}
		}
	}
	listed := "ok"
	if ws, err := hx.Workloads(); err != nil {
		listed = err.Error()
	} else {
		listed = fmt.Sprintf("ok, %d workloads", len(ws))
	}
	if len(minority) == 1 {
		hx.LinkUp()
	} else {
		f.Heal(minority)
	}
	healAt := time.Now()

	ok, failed, onMinority := 0, 0, 0
	deployed := map[string]bool{}
	var first, last time.Time
	for _, l := range log {
		if l.err != nil {
			failed++
			t.Logf("deploy failed during the partition: %v", l.err)
			continue
		}
		ok++
		deployed[l.d.ID] = true
		if first.IsZero() {
			first = l.at
		}
		last = l.at
		if _, bad := minorityIDs[l.d.Node]; bad {
			onMinority++
		}
	}
	rate := 0.0
	if ok > 1 {
		rate = float64(ok-1) / last.Sub(first).Seconds()
	}
	fg.Add("placements on the majority side (ok/failed)", fmt.Sprintf("%d/%d", ok, failed))
	fg.Add("placements/s on the majority side", fmt.Sprintf("%.1f", rate))
	var slowest deployLog
	for _, l := range log {
		if l.took > slowest.took {
			slowest = l
		}
	}
	if slowest.took > 0 {
		fg.Add("slowest deploy on the majority side", fmt.Sprintf("%v, started +%v after the cut", slowest.took.Round(100*time.Millisecond),
			slowest.at.Add(-slowest.took).Sub(cutAt).Round(100*time.Millisecond)))
	}
	fg.Add("placements on the unreachable node(s)", onMinority)
	fg.Add("cut-off hosts' own workloads running during partition", fmt.Sprintf("%d of %d", runningX, preX))
	fg.Add(hx.Name+" control socket answers during partition", fmt.Sprintf("%d ok, %d failed", statusOK, statusFail))
	fg.Add(hx.Name+" STATUS at the end of the partition", seenStatus)
	fg.Add(hx.Name+" STATUS first showed a reconnect", firstChange)
	fg.Add(hx.Name+" STATUS first showed JetStream lost", jsSeen)
	notified, notifiedAt := hx.NotifyStatusSince(cutAt, "jetstream unavailable")
	if notified != "" {
		notified = fmt.Sprintf("+%v: %s", notifiedAt.Sub(cutAt).Round(100*time.Millisecond), notified)
	}
	fg.Add(hx.Name+" sd_notify STATUS= with the lost cluster", notified)
	fg.Add(hx.Name+" nexctl status JetStream line", lineWith(ctlStatus, "JetStream"))
	fg.Add(hx.Name+" metrics", strings.Join(jsMetrics, "; "))
	fg.Add("majority side's JetStream states at the end", strings.Join(majJS, ", "))
	fg.Add(hx.Name+" control socket workload list at the end", listed)
	if h1.Cgroup == "" {
		t.Skip("no cgroup v1 memory hierarchy: the kernel-side checks need it")
	}

	var back time.Duration
	testkit.EventuallyWithin(t, 120*time.Second, "every node back in node list", func() bool {
		if len(h1.NodeNames(h1.ClusterURLs())) == n {
			back = time.Since(healAt)
			return true
		}
		return false
	})
	fg.Add("time until node list shows every node again", back.Round(100*time.Millisecond))
	var jsBack time.Duration
	if testkit.WaitFor(90*time.Second, func() bool { return jsState(hx) == "ok" }) {
		jsBack = time.Since(healAt)
		fg.Add("time until "+hx.Name+"'s STATUS shows JetStream ok again", jsBack.Round(100*time.Millisecond))
	} else {
		fg.Add("time until "+hx.Name+"'s STATUS shows JetStream ok again", "not within 90s: "+jsState(hx))
	}

	// After healing: every workload runs exactly once, the cut-off hosts' included: in
	// the kernel (processes in its cgroup on one host) and, once they caught up, in what
	// the nodes report.
	for id := range deployed {
		pre[id] = "majority"
	}
	kernel := f.RunningInKernel()
	dup, lost := 0, 0
	for id := range pre {
		switch len(kernel[id]) {
		case 0:
			lost++
			t.Errorf("workload %s (%s) has no processes after healing", id, pre[id])
		case 1:
		default:
			dup++
			t.Errorf("workload %s runs on %v", id, kernel[id])
		}
	}
	healedAt := time.Now()
	var reported map[string][]string
	reportedOK := testkit.WaitFor(60*time.Second, func() bool {
		reported = f.Running()
		for id := range pre {
			if len(reported[id]) != 1 {
				return false
			}
		}
		return true
	})
	if reportedOK {
		fg.Add("time until the nodes list every workload once", "+"+time.Since(healedAt).Round(100*time.Millisecond).String())
	} else {
		t.Errorf("the nodes' workload lists did not show every workload exactly once within 60s of healing")
	}
	fg.Add("workloads lost after healing", lost)
	fg.Add("workloads duplicated after healing", dup)
	if onMinority > 0 || runningX != preX || ok == 0 {
		t.Fatalf("placed %d on the unreachable node(s), %d of their %d workloads ran, %d placements on the majority", onMinority, runningX, preX, ok)
	}
	if len(minority) == 1 && (jsSeen == "" || notified == "" || !strings.Contains(lineWith(ctlStatus, "JetStream"), "UNAVAILABLE") ||
		!slices.Contains(jsMetrics, `nexd_jetstream_state{state="unavailable"} 1`)) {
		t.Fatalf("%s did not show the lost cluster's JetStream during the partition everywhere: control status %q, STATUS= %q, nexctl status %q, metrics %q",
			hx.Name, jsSeen, notified, lineWith(ctlStatus, "JetStream"), jsMetrics)
	}
}

// jsState is what h's STATUS says about its state bucket's JetStream.
func jsState(h *Host) string {
	st, err := h.Status()
	switch {
	case err != nil:
		return err.Error()
	case st.NATS.JetStream == nil:
		return "(not known yet)"
	}
	return st.NATS.JetStream.State
}

// lineWith is the first line of text containing want.
func lineWith(text, want string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, want) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// TestFleetDiskFull: host 2's state directory is a small tmpfs that is filled up while
// the node runs workloads. Within about a check (5 s) the node stops bidding: a deploy
// for it finds no bid (before, it bid, won and refused the deploy: disk full), nexctl
// status on it says its local state cannot be written, its workloads keep running, and
// the other nodes keep taking deploys. Once the space is freed it bids again within
// about a second. Counted: deploys that went to h2 while full (0), h2's workloads lost (0).
func TestFleetDiskFull(t *testing.T) {
	f := NewFleet(t, 3)
	fg := NewFigures(t, "disk full in one node's state directory")
	f.StartClusterNATS()
	h1, h2 := f.Hosts[0], f.Hosts[1]
	h2.SmallStateDir("16m")
	for _, h := range f.Hosts {
		h.StartNexd(h.ClusterURLs())
	}
	urls := h1.ClusterURLs()
	testkit.EventuallyWithin(t, 60*time.Second, "every node in node list", func() bool { return len(h1.NodeNames(urls)) == 3 })
	var before []string
	for i := range 2 {
		d, err := h1.Deploy(urls, fmt.Sprintf("before-%d", i), "--tags", "host=h2")
		if err != nil {
			t.Fatal(err)
		}
		before = append(before, d.ID)
	}
	fg.Add("bytes written until the state dir was full", h2.FillStateDir())
	full := time.Now()
	testkit.EventuallyWithin(t, 30*time.Second, "h2's status says its local state cannot be written", func() bool {
		st, err := h2.Status()
		return err == nil && st.LocalState != nil && st.LocalState.State == "unwritable"
	})
	fg.Add("h2 stops bidding after the fill", time.Since(full).Round(time.Millisecond).String())

	went := 0
	for i := range 3 {
		start := time.Now()
		_, err := h1.Deploy(urls, fmt.Sprintf("onfull-%d", i), "--tags", "host=h2")
		if err == nil || !strings.Contains(err.Error(), "no bids for") {
			went++ // ran, or won by h2 and refused
		}
		fg.Add(fmt.Sprintf("deploy %d for the full node", i), fmt.Sprintf("%v (after %v)", err, time.Since(start).Round(time.Millisecond)))
	}
	fg.Add("deploys that went to the full node", fmt.Sprintf("%d of 3", went))
	if went != 0 {
		t.Errorf("%d of 3 deploys for the node with a full state directory went to it; want none (no bid)", went)
	}
	for _, other := range []string{"h1", "h3"} {
		if _, err := h1.Deploy(urls, "other-"+other, "--tags", "host="+other); err != nil {
			t.Errorf("deploy to %s while h2's disk is full: %v", other, err)
		}
	}
	kept := 0
	for _, id := range before {
		if h2.Cgroup == "" || len(h2.WorkloadPIDs(id)) > 0 {
			kept++
		}
	}
	fg.Add("h2's workloads still running", fmt.Sprintf("%d of %d", kept, len(before)))
	if kept != len(before) {
		t.Errorf("h2 lost workloads when its disk filled up")
	}
	st, err := h2.Status()
	fg.Add("h2 STATUS with a full disk", fmt.Sprintf("%v %v %+v", st.State, err, st.LocalState))
	h2.FreeStateDir()
	testkit.EventuallyWithin(t, 30*time.Second, "h2 bids again once space is freed", func() bool {
		st, err := h2.Status()
		return err == nil && st.LocalState != nil && st.LocalState.State == "ok"
	})
	_, err = h1.Deploy(urls, "afterfree", "--tags", "host=h2")
	fg.Add("deploy to h2 after freeing space", fmt.Sprint(err))
	if err != nil {
		t.Errorf("h2 refuses deploys after its disk was freed: %v", err)
	}
}

// startLeafSites is topologies (b) and (c): a central nats-server in the hub namespace,
// in operator mode, and on every host a nexd whose embedded server is a leaf node of it
// (nats.leaf_remote) authenticating with a credentials file (nats.leaf_creds: the URL
// carries no user), with the site's own JetStream domain (nats.jsdomain site<N>).
// nexctl at the hub uses the hub's admin credentials (f.CtlArgs).
func startLeafSites(t *testing.T, n int) *Fleet {
	f := NewFleet(t, n)
	creds := f.StartHubOperator()
	f.CtlArgs = []string{"--nats.creds-file", creds.Admin}
	for _, h := range f.Hosts {
		h.StartNexd("", "--nats.leaf-remote", "nats-leaf://"+subnet+".1:7422", "--nats.leaf-creds", creds.Leaf,
			"--nats.jsdomain", "site"+strconv.Itoa(h.N), "--embedded-nats-port", "4222")
	}
	hub := f.Hub()
	testkit.EventuallyWithin(t, 60*time.Second, "every site's node in node list at the hub", func() bool {
		return len(hub.NodeNames(f.HubURL())) == n
	})
	return f
}

// pingCounts reads a talker's "OK FAILED" file.
func pingCounts(path string) (ok, failed int) {
	b, err := os.ReadFile(path)
	if err == nil {
		fmt.Sscan(string(b), &ok, &failed)
	}
	return ok, failed
}

// TestFleetLeafWANOutage: three sites, each host's embedded server a leaf of the hub.
// Two workloads on site 2 talk request/reply through their local server; site 2's
// WAN link goes down for NEXD_FLEET_OUTAGE (default 20s; the figure is 60s).
// Figures: requests answered and failed during the outage (failed must be 0), what
// the hub sees, placements from the hub during the outage (none on site 2), and the
// time until the hub's node list shows site 2 again.
func TestFleetLeafWANOutage(t *testing.T) {
	outage := durationEnv(t, "NEXD_FLEET_OUTAGE", 20*time.Second)
	f := startLeafSites(t, 3)
	fg := NewFigures(t, fmt.Sprintf("WAN outage of a leaf site for %v", outage))
	hub, h2 := f.Hub(), f.Hosts[1]
	talker := bins.Path(t, "./testdata/talker")
	out, err := os.MkdirTemp("", prefix+strconv.Itoa(os.Getpid())+"talk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(out) })
	if err := os.Chmod(out, 0o1777); err != nil { // workloads run as dynamic uids
		t.Fatal(err)
	}
	counts := filepath.Join(out, "h2.count")
	if _, err := hub.DeployCmd(f.HubURL(), "serve", []string{talker, "serve", "system.talk.h2"}, "--tags", "host=h2"); err != nil {
		t.Fatal(err)
	}
	if _, err := hub.DeployCmd(f.HubURL(), "ping", []string{talker, "ping", "system.talk.h2", counts}, "--tags", "host=h2"); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the two site workloads talking", func() bool {
		ok, _ := pingCounts(counts)
		return ok >= 5
	})

	ok0, failed0 := pingCounts(counts)
	h2.LinkDown()
	cutAt := time.Now()
	var hubSees []string
	testkit.EventuallyWithin(t, 30*time.Second, "the hub to lose site 2", func() bool {
		hubSees = hub.NodeNames(f.HubURL())
		return !slices.Contains(hubSees, "h2")
	})
	fg.Add("hub's node list during the outage", fmt.Sprint(hubSees))
	placed, placedOn := 0, map[string]int{}
	for i := range 3 {
		d, err := hub.Deploy(f.HubURL(), fmt.Sprintf("during-%d", i))
		if err != nil {
			t.Errorf("deploy from the hub during site 2's outage: %v", err)
			continue
		}
		placed++
		placedOn[d.Node]++
	}
	st2, _ := h2.Status()
	if placedOn[st2.NodeID] > 0 {
		t.Errorf("placed %d workloads on the unreachable site", placedOn[st2.NodeID])
	}
	fg.Add("placements from the hub during the outage", fmt.Sprintf("%d of 3, %d on site 2", placed, placedOn[st2.NodeID]))
	// The site's server notices its silent leaf link by pings (5 s, 3 outstanding):
	// the outage lasts at least until it has, at most 60 s.
	leafSeen := time.Duration(0)
	if testkit.WaitFor(60*time.Second, func() bool {
		st, err := h2.Status()
		return err == nil && st.NATS.Leaf != nil && st.NATS.Leaf.Connected < st.NATS.Leaf.Remotes
	}) {
		leafSeen = time.Since(cutAt)
	}
	fg.Add("site 2 STATUS showed its leaf link down", fmt.Sprintf("+%v", leafSeen.Round(100*time.Millisecond)))
	// STATUS= says so at the status loop's next round (every 5 s, later on a loaded
	// machine): the outage lasts until it has, at most 60 s more.
	testkit.WaitFor(60*time.Second, func() bool {
		n, _ := h2.NotifyStatusSince(cutAt, "leaf to hub down")
		return n != ""
	})
	if left := outage - time.Since(cutAt); left > 0 {
		time.Sleep(left)
	}
	ok1, failed1 := pingCounts(counts)
	fg.Add("site 2 requests answered during the outage", ok1-ok0)
	fg.Add("site 2 requests failed during the outage", failed1-failed0)
	// The site still answers its own clients ("connected"); its leaf link is what
	// STATUS, nexctl status, the metrics and STATUS= show as down.
	leafDown := false
	if st, err := h2.Status(); err == nil {
		leaf := "(none)"
		if st.NATS.Leaf != nil {
			leaf = fmt.Sprintf("%d of %d connected", st.NATS.Leaf.Connected, st.NATS.Leaf.Remotes)
			leafDown = st.NATS.Leaf.Connected < st.NATS.Leaf.Remotes
		}
		fg.Add("site 2 STATUS during the outage", fmt.Sprintf("state %s, nats %s connected=%v, leaf %s", st.State, st.NATS.Server, st.NATS.Connected, leaf))
	}
	ctlStatus, _, _ := h2.CtlLocal("status")
	fg.Add("site 2 nexctl status Leaf line", lineWith(ctlStatus, "Leaf"))
	leafMetrics := h2.Metrics("nexd_nats_leaf")
	fg.Add("site 2 metrics", strings.Join(leafMetrics, "; "))
	notified, notifiedAt := h2.NotifyStatusSince(cutAt, "leaf to hub down")
	if notified != "" {
		notified = fmt.Sprintf("+%v: %s", notifiedAt.Sub(cutAt).Round(100*time.Millisecond), notified)
	}
	fg.Add("site 2 sd_notify STATUS= with the leaf down", notified)
	if !leafDown || !strings.Contains(lineWith(ctlStatus, "Leaf"), "DOWN") || notified == "" ||
		!slices.Contains(leafMetrics, "nexd_nats_leaf_connected 0") {
		t.Errorf("site 2's status does not show its leaf link down during the outage")
	}
	h2.LinkUp()
	healAt := time.Now()
	var back time.Duration
	testkit.EventuallyWithin(t, 120*time.Second, "site 2 back in the hub's node list", func() bool {
		if slices.Contains(hub.NodeNames(f.HubURL()), "h2") {
			back = time.Since(healAt)
			return true
		}
		return false
	})
	fg.Add("time until the hub's node list shows site 2 again", back.Round(100*time.Millisecond))
	if ok1-ok0 < int(outage/time.Second) || failed1 > failed0 {
		t.Fatalf("site 2's workloads did not keep talking through the outage: %d answered, %d failed", ok1-ok0, failed1-failed0)
	}
}

// percentile is the p-th percentile (nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(i, 0)].Round(time.Millisecond)
}

// TestFleetLeafLatency: three leaf sites whose links to the hub run through the test
// kit's LagProxy (this kernel has no netem): NEXD_FLEET_DELAY each way (default 100ms,
// so 200ms round trip between a site and the hub) and NEXD_FLEET_LOSS (default 0.05:
// 5% of chunks held a 200ms RTO longer, as a lost TCP segment would be). Figures:
// auction completeness (bids from every site, and within nexctl's 250ms stall between
// bids) over NEXD_FLEET_AUCTIONS auctions, bid and placement p50/p99.
func TestFleetLeafLatency(t *testing.T) {
	delay := durationEnv(t, "NEXD_FLEET_DELAY", 100*time.Millisecond)
	loss := 0.05
	if v := os.Getenv("NEXD_FLEET_LOSS"); v != "" {
		var err error
		if loss, err = strconv.ParseFloat(v, 64); err != nil || loss < 0 || loss > 1 {
			t.Fatalf("NEXD_FLEET_LOSS=%q: want 0..1", v)
		}
	}
	auctions := 20
	if v := os.Getenv("NEXD_FLEET_AUCTIONS"); v != "" {
		auctions, _ = strconv.Atoi(v)
	}
	f := NewFleet(t, 3)
	fg := NewFigures(t, fmt.Sprintf("leaf sites, %v each way and %.0f%% loss between each site and the hub", delay, loss*100))
	f.StartHub()
	hubLeaf := subnet + ".1:7422"
	var proxies []*testkit.LagProxy
	for _, h := range f.Hosts {
		addr := fmt.Sprintf("%s.1:%d", subnet, 7430+h.N)
		ln, err := listenIn(f.hub, addr)
		if err != nil {
			t.Fatal(err)
		}
		proxies = append(proxies, testkit.StartLagProxy(t, ln, func() (net.Conn, error) { return dialIn(f.hub, hubLeaf, 5*time.Second) },
			testkit.Lag{Delay: delay, Loss: loss}))
		h.StartNexd("", "--insecure-argv", "--nats.leaf-remote", "nats-leaf://leaf:leafpw@"+addr, "--nats.jsdomain", "site"+strconv.Itoa(h.N),
			"--embedded-nats-port", "4222")
	}
	hub := f.Hub()
	// nexctl's scatter-gather ends --gather-stall (default 25ms) after the last answer:
	// too short when answers come 200ms apart. The default's view is a figure too.
	f.CtlArgs = []string{"--gather-stall", "1s"}
	testkit.EventuallyWithin(t, 90*time.Second, "every site's node in node list at the hub", func() bool {
		return len(hub.NodeNames(f.HubURL())) == 3
	})
	f.CtlArgs = nil
	var seen []int
	for range 5 {
		seen = append(seen, len(hub.NodeNames(f.HubURL())))
	}
	fg.Add("nodes in node list with the default --gather-stall 25ms", fmt.Sprint(seen))
	f.CtlArgs = []string{"--gather-stall", "1s"}

	nc, err := nats.Connect(f.HubURL(), nats.SetCustomDialer(nsDialer{f.hub}))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var complete, withinStall int
	var lastBid []time.Duration
	for range auctions {
		inbox := nats.NewInbox()
		sub, err := nc.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: nuid.Next(), Tags: map[string]string{}})
		start := time.Now()
		if err := nc.PublishRequest(protocol.AuctionSubject("system"), inbox, data); err != nil {
			t.Fatal(err)
		}
		var at []time.Duration
		for len(at) < 3 {
			if _, err := sub.NextMsg(5*time.Second - time.Since(start)); err != nil {
				break
			}
			at = append(at, time.Since(start))
		}
		sub.Unsubscribe()
		if len(at) == 3 {
			complete++
			lastBid = append(lastBid, at[2])
			if at[1]-at[0] <= 250*time.Millisecond && at[2]-at[1] <= 250*time.Millisecond {
				withinStall++
			}
		}
	}
	fg.Add("auctions with a bid from every site (in 5s)", fmt.Sprintf("%d of %d", complete, auctions))
	fg.Add("auctions complete within nexctl's 250ms stall", fmt.Sprintf("%d of %d", withinStall, auctions))
	fg.Add("time to the last bid p50 / p99", fmt.Sprintf("%v / %v", percentile(lastBid, 50), percentile(lastBid, 99)))

	var placements []time.Duration
	failed := 0
	for i := range auctions / 2 {
		start := time.Now()
		if _, err := hub.Deploy(f.HubURL(), fmt.Sprintf("lag-%d", i)); err != nil {
			failed++
			t.Logf("deploy through the slow links: %v", err)
			continue
		}
		placements = append(placements, time.Since(start))
	}
	fg.Add("placements (nexctl workload run from the hub) ok/failed", fmt.Sprintf("%d/%d", len(placements), failed))
	fg.Add("placement p50 / p99 (incl. nexctl start-up)", fmt.Sprintf("%v / %v", percentile(placements, 50), percentile(placements, 99)))
	var chunks, lost int
	for _, p := range proxies {
		c, l := p.Stats()
		chunks, lost = chunks+c, lost+l
	}
	fg.Add("proxied chunks / held as lost", fmt.Sprintf("%d / %d", chunks, lost))
	if complete < auctions*9/10 || failed > 0 {
		t.Fatalf("through %v and %.0f%% loss: %d of %d auctions complete, %d deploys failed", delay, loss*100, complete, auctions, failed)
	}
}
