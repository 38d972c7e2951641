package fleet

import (
	"fmt"
	"os"
	"slices"
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
	at  time.Time
	d   Deployed
	err error
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
		d, err := from.Deploy(servers, fmt.Sprintf("%s%d", prefix, i))
		log = append(log, deployLog{at: time.Now(), d: d, err: err})
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
	for _, h := range f.Hosts {
		line := h.Nexd.LogLine("workload state bucket", "wanted=")
		if !strings.Contains(line, "replicas=3") {
			t.Fatalf("%s: state bucket not R3 with 3 servers: %q", h.Name, line)
		}
		fg.Add(h.Name+" state bucket", line[strings.Index(line, "replicas="):])
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
