package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// deployN places n workloads with k concurrent clients (sharing one connection, as
// goroutines of one client would) and returns their ids and the wall time until the
// last one announced itself.
func deployN(ctx context.Context, c *client, w workloadSpec, nodes, n, k int, prefix string) ([]string, time.Duration, error) {
	ids := make([]string, n)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	ao := gatherOpts{first: 10 * time.Second, stall: time.Second, max: nodes}
	start := time.Now()
	var wg sync.WaitGroup
	for range k {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				p, err := c.place(ctx, ao, w, fmt.Sprintf("%s-%d", prefix, i), 2*time.Minute)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					next.Store(int64(n)) // stop every client
					return
				}
				ids[i] = p.ID
			}
		})
	}
	wg.Wait()
	return ids, time.Since(start), firstErr
}

// stopAll undeploys ids with k concurrent clients and returns each stop's latency.
func stopAll(ctx context.Context, c *client, ids []string, nodes, k int) ([]time.Duration, time.Duration, error) {
	var next atomic.Int64
	var mu sync.Mutex
	var ds []time.Duration
	var errs []error
	uo := gatherOpts{first: 30 * time.Second, stall: 15 * time.Second, max: nodes} // every node answers; a stop may outlast a short stall
	start := time.Now()
	var wg sync.WaitGroup
	for range k {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(ids) || ctx.Err() != nil {
					return
				}
				if ids[i] == "" {
					continue
				}
				t := time.Now()
				err := c.undeploy(ctx, ids[i], uo)
				d := time.Since(t)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					ds = append(ds, d)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		return ds, time.Since(start), fmt.Errorf("%d stops failed, first: %w", len(errs), errs[0])
	}
	return ds, time.Since(start), nil
}

// throughput: deploys per second until the target runs on one node, for each client
// count, then the latency of stopping them all.
func (h *Harness) throughput(ctx context.Context) ([]Result, error) {
	c, _, err := h.fleetUp(ctx, 1, false)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	nodes := 1
	if len(h.o.Servers) > 0 {
		nodes = max(1, h.bidders(ctx, c))
	}
	var out []Result
	for _, k := range h.o.Clients {
		r := Result{Scenario: "throughput", Variant: fmt.Sprintf("%d client(s), %d workloads", k, h.o.Target)}
		ids, took, err := deployN(ctx, c, h.workload(), nodes, h.o.Target, k, fmt.Sprintf("tp%d", k))
		placed := 0
		for _, id := range ids {
			if id != "" {
				placed++
			}
		}
		r.add("running", float64(placed), "")
		r.add("deploys/s", float64(placed)/took.Seconds(), "1/s")
		r.ms("time to all running", took)
		ds, stopTook, serr := stopAll(ctx, c, ids, nodes, k)
		s := Summarize(ds)
		r.add("stops/s", float64(s.N)/stopTook.Seconds(), "1/s")
		r.addSummary("stop latency", s)
		out = append(out, r)
		if err := errors.Join(err, serr); err != nil {
			return out, err
		}
	}
	return out, nil
}

// nodeSample is the node's and its nexlets' footprint at one moment.
type nodeSample struct {
	nexdRSS, nexdPSS, nexletRSS, nexletPSS int64
	nexdThreads, nexletThreads, nexlets    int
	cpuTicks                               int64
}

// sampleNode reads nexd and its direct children, the nexlets (workloads are the
// nexlets' children, never nexd's).
func sampleNode(n *nodeProc) (nodeSample, error) {
	var s nodeSample
	pid := n.Pid()
	var err error
	if s.nexdRSS, s.nexdThreads, err = procStatus(pid); err != nil {
		return s, fmt.Errorf("nexd /proc: %w", err)
	}
	s.nexdPSS, _ = procPSS(pid)
	s.cpuTicks, _ = procCPU(pid)
	for _, cp := range childrenOf(pid) {
		rss, th, err := procStatus(cp)
		if err != nil {
			continue
		}
		pss, _ := procPSS(cp)
		t, _ := procCPU(cp)
		s.nexletRSS += rss
		s.nexletPSS += pss
		s.nexletThreads += th
		s.cpuTicks += t
		s.nexlets++
	}
	return s, nil
}

// settle is how long memory is left to settle before it is sampled: a quiet nexd and
// nexlet give a burst's garbage and free heap back after two quiet seconds (memtrim);
// Go's runtime alone (upstream) returns it over minutes.
const settle = 5 * time.Second

// footprintDeploys is how many placements the footprint scenario times at each count.
const footprintDeploys = 30

// footprint: nexd's and the native nexlet's memory, threads and idle CPU with 0, 100
// and 1,000 running workloads on one node with external NATS, and a deploy's latency
// at each count.
func (h *Harness) footprint(ctx context.Context) ([]Result, error) {
	if len(h.o.Servers) > 0 {
		return nil, errNoServers
	}
	dropCached(h.o.Nexd)
	c, nodes, err := h.fleetUp(ctx, 1, false)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	n := nodes[0]
	var out []Result
	var base nodeSample
	running := 0
	for _, want := range h.o.Footprint {
		if want > running {
			ids, _, err := deployN(ctx, c, h.workload(), 1, want-running, 8, fmt.Sprintf("fp%d", want))
			if err != nil {
				return out, err
			}
			running += len(ids)
		}
		// Let start-up garbage be collected and heartbeats settle before sampling.
		time.Sleep(settle)
		before, err := sampleNode(n)
		if err != nil {
			return out, err
		}
		time.Sleep(h.o.Idle)
		after, err := sampleNode(n)
		if err != nil {
			return out, err
		}
		r := Result{Scenario: "footprint", Variant: fmt.Sprintf("%d workloads", running)}
		m := r.add("nexd RSS", mb(after.nexdRSS), "MB")
		if running == 0 {
			m.atMost(25, "<= 25 MB")
		}
		r.add("nexd PSS", mb(after.nexdPSS), "MB")
		r.add("nexd threads", float64(after.nexdThreads), "")
		r.add("nexlet RSS", mb(after.nexletRSS), "MB")
		r.add("nexlet PSS", mb(after.nexletPSS), "MB")
		r.add("nexlet threads", float64(after.nexletThreads), "")
		cpu := float64(after.cpuTicks-before.cpuTicks) / clkTck / h.o.Idle.Seconds() * 100
		r.add("idle CPU (nexd + nexlet)", cpu, "% of one core")
		if running == 0 {
			base = after
		} else {
			per := float64((after.nexdPSS+after.nexletPSS)-(base.nexdPSS+base.nexletPSS)) / float64(running) / 1024
			r.add("node + nexlet PSS per workload", per, "KB").atMost(40, "<= 40 KB")
			if wp := workloadPSS(n); wp > 0 {
				r.add("workload process PSS (avg, not counted above)", float64(wp)/1024, "KB")
			}
		}
		// A deploy's latency with this many running: placements, each stopped again.
		var deploys []time.Duration
		for k := range footprintDeploys {
			p, err := c.place(ctx, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}, h.workload(), fmt.Sprintf("fpd%d-%d", running, k), time.Minute)
			if err != nil {
				return out, fmt.Errorf("placement with %d running: %w", running, err)
			}
			if err := c.undeploy(ctx, p.ID, gatherOpts{first: 30 * time.Second, stall: time.Second, max: 1}); err != nil {
				return out, err
			}
			deploys = append(deploys, p.Deploy)
		}
		r.add("deploy request p50 (one more workload)", float64(Summarize(deploys).P50)/float64(time.Millisecond), "ms")
		r.notef("idle CPU sampled over %s; %d nexlet process(es); deploy p50 of %d placements, each stopped again", h.o.Idle, after.nexlets, footprintDeploys)
		out = append(out, r)
	}
	return out, nil
}

// workloadPSS averages the PSS of the workload processes under the nexlet.
func workloadPSS(n *nodeProc) int64 {
	var sum int64
	var k int64
	for _, nl := range childrenOf(n.Pid()) {
		for _, wp := range childrenOf(nl) {
			if p, err := procPSS(wp); err == nil {
				sum += p
				k++
			}
		}
	}
	if k == 0 {
		return 0
	}
	return sum / k
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

// workloadPIDs maps each NEX_WORKLOAD_ID to its live processes, sorted.
func workloadPIDs() map[string][]int {
	out := map[string][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		for kv := range strings.SplitSeq(string(b), "\x00") {
			if id, ok := strings.CutPrefix(kv, "NEX_WORKLOAD_ID="); ok {
				out[id] = append(out[id], pid)
				break
			}
		}
	}
	for _, p := range out {
		slices.Sort(p)
	}
	return out
}

// recovery: kill -9 nexd with N workloads running and stored in KV, restart it on the
// same state dir, and time until every workload is listed running again. Workloads
// outlive nexd and its nexlet, so the new nexlet adopts them: the same processes, none
// started again.
func (h *Harness) recovery(ctx context.Context) ([]Result, error) {
	if len(h.o.Servers) > 0 {
		return nil, errNoServers
	}
	r := Result{Scenario: "recovery", Variant: fmt.Sprintf("%d workloads, --state kv", h.o.Recovery)}
	c, nodes, err := h.fleetUp(ctx, 1, true)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	n := nodes[0]
	pings, err := c.ping(ctx, gatherOpts{first: 5 * time.Second, stall: 100 * time.Millisecond, max: 1})
	if err != nil {
		return nil, fmt.Errorf("recovery: node id: %w", err)
	}
	if len(pings) == 0 {
		return nil, errors.New("recovery: node id: the node did not answer a ping")
	}
	nodeID := pings[0].NodeID
	ids, _, err := deployN(ctx, c, h.workload(), 1, h.o.Recovery, 32, "rec")
	if err != nil {
		return []Result{r}, err
	}
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	// Give the node a moment to persist the last start requests.
	time.Sleep(time.Second)
	before := workloadPIDs()
	c.tracker.reset()
	n.kill9()
	killed := time.Now()
	time.Sleep(200 * time.Millisecond)
	alive := 0
	for id, p := range workloadPIDs() {
		if want[id] {
			alive += len(p)
		}
	}
	h.mu.Lock()
	for i, m := range h.nodes {
		if m == n {
			h.nodes = append(h.nodes[:i], h.nodes[i+1:]...)
		}
	}
	h.mu.Unlock()
	spec := n.spec
	restarted := time.Now()
	_, readyIn, err := h.readyNode(ctx, spec)
	if err != nil {
		return []Result{r}, fmt.Errorf("restart: %w", err)
	}
	// Wait until every id is listed running again, bounded.
	deadline := time.Now().Add(max(60*time.Second, time.Duration(h.o.Recovery)*100*time.Millisecond))
	var allIn time.Duration
	for time.Now().Before(deadline) && ctx.Err() == nil {
		running, err := c.running(ctx, nodeID)
		got := 0
		for id := range running {
			if want[id] {
				got++
			}
		}
		if err == nil && got == len(want) {
			allIn = time.Since(restarted)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Settle, then compare processes per id and count fresh announcements (restarts).
	time.Sleep(3 * time.Second)
	counts := c.tracker.counts()
	after := workloadPIDs()
	var same, changed, missing, restartedIDs int
	for id := range want {
		switch {
		case len(after[id]) == 0:
			missing++
		case slices.Equal(after[id], before[id]):
			same++
		default:
			changed++
		}
		if counts[id] > 0 {
			restartedIDs++
		}
	}
	r.add("workloads before kill", float64(len(want)), "")
	r.add("workload processes alive 200 ms after kill -9", float64(alive), "")
	r.ms("restart exec to READY=1", readyIn)
	if allIn > 0 {
		r.ms("restart exec to all re-attached (listed running)", allIn).atMost(1000, "<= 1 s")
		r.ms("kill to all re-attached", allIn+restarted.Sub(killed))
	} else {
		r.notef("not every workload was listed running again within the bound")
	}
	r.add("ids with the same processes as before", float64(same), "")
	r.add("ids with other processes (restarted)", float64(changed), "")
	r.add("ids without a process", float64(missing), "")
	r.add("ids started again (announced)", float64(restartedIDs), "")
	return []Result{r}, nil
}
