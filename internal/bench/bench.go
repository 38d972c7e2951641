package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/dirlock"
)

// Options configure a run; zero values take the defaults of Defaults.
type Options struct {
	Nexd       string   // nexd binary
	Nexctl     string   // nexctl binary (fleet: node list latency)
	Self       string   // this tool's binary, deployed as the "nats" workload
	Servers    []string // measure the nodes behind these NATS URLs instead of starting nexd (placement, throughput)
	Namespace  string
	Workload   string // "sh" or "nats"
	Quick      bool
	Placements int           // deploys per placement variant
	Target     int           // running workloads the throughput scenario reaches
	Clients    []int         // concurrent clients of the throughput scenario
	Stall      time.Duration // fixed auction stall of the non-early-return variant
	Nodes      int           // nodes of the multi-node placement variant
	FleetSizes []int         // node counts of the fleet scenario
	Footprint  []int         // workload counts of the footprint scenario
	Recovery   int           // workloads of the recovery scenario
	// ReadyStarts is how many starts ready and compare's exec -> ready time per side.
	ReadyStarts int
	// NexdB and EnvB make ready time a second nexd (NexdB, else Nexd) with EnvB added
	// to its environment, its starts alternating with Nexd's one by one (A/B).
	NexdB string
	EnvB  []string
	// ReadyStateKV makes ready's A/B nexd starts keep node state in KV under one node id
	// a side, whose bucket holds StateRecords workload records of a type no nexlet runs
	// (readyState); without it they keep it in memory, a fresh node id each start.
	ReadyStateKV bool
	StateRecords int
	Idle         time.Duration // idle CPU sampling window
	Keep         bool          // keep the temp dir (logs) after the run
	Upstream     string        // upstream's nex binary (compare)
	// CompareWorkloads are the running-workload counts compare samples memory at.
	CompareWorkloads []int
	// NexdArgs are added to every nexd the tool starts (e.g. a wider
	// --workload-uid-range for more workloads than the default range has uids).
	NexdArgs []string
	// RuntimeOnHost keeps compare's measured nexd's runtime paths on the host's file
	// systems; by default they are tmpfs in a mount namespace of its own, as /run is on
	// a systemd host (see runtimeTmpfs).
	RuntimeOnHost bool
	// SamplesOut, when set, is a file each placement is appended to as a line: the
	// variant, its start (Unix ns) and its legs in µs, to read against node-side traces.
	SamplesOut string
	Log        *slog.Logger
}

// Defaults fills unset options: the full run, or the quick smoke run.
func (o *Options) Defaults() {
	def := func(p *int, full, quick int) {
		if *p <= 0 {
			*p = full
			if o.Quick {
				*p = quick
			}
		}
	}
	def(&o.Placements, 500, 50)
	def(&o.Target, 1000, 100)
	def(&o.Recovery, 1000, 100)
	def(&o.ReadyStarts, 5, 3)
	def(&o.Nodes, 10, 10)
	if len(o.Clients) == 0 {
		o.Clients = []int{1, 8, 32}
	}
	if len(o.FleetSizes) == 0 {
		o.FleetSizes = []int{1, 10, 50}
		if o.Quick {
			o.FleetSizes = []int{1, 10}
		}
	}
	if len(o.Footprint) == 0 {
		o.Footprint = []int{0, 100, 1000}
		if o.Quick {
			o.Footprint = []int{0, 100}
		}
	}
	if len(o.CompareWorkloads) == 0 {
		o.CompareWorkloads = []int{100}
	}
	if o.Stall <= 0 {
		o.Stall = 20 * time.Millisecond
	}
	if o.Idle <= 0 {
		o.Idle = 5 * time.Second
		if o.Quick {
			o.Idle = 2 * time.Second
		}
	}
	if o.Namespace == "" {
		o.Namespace = "system"
	}
	if o.Workload == "" {
		o.Workload = "sh"
	}
	if o.Nexd == "" {
		o.Nexd = "./bin/nexd"
	}
	if o.Nexctl == "" {
		o.Nexctl = "./bin/nexctl"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Scenarios lists the scenario names in the order `all` runs them.
func Scenarios() []string {
	return []string{"ready", "control", "placement", "throughput", "footprint", "recovery", "fleet"}
}

// Harness owns everything a run starts: temp dirs, NATS servers, nexd processes and
// cgroup directories, all removed by Close.
type Harness struct {
	o     Options
	dir   string
	runID string
	cg    string
	hold  *dirlock.Lock // the run's cgroup directory, held while it runs (reap.go)
	mu    sync.Mutex
	nodes []*nodeProc
	nats  []*natsServer
	seq   int
}

// NewHarness prepares a run directory.
func NewHarness(o Options) (*Harness, error) {
	o.Defaults()
	for _, p := range []*string{&o.Nexd, &o.Nexctl, &o.Self, &o.Upstream} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, err
		}
		*p = abs
	}
	if _, err := os.Stat(o.Nexd); err != nil && len(o.Servers) == 0 {
		return nil, fmt.Errorf("nexd binary: %w (build it with make build, or pass --nexd)", err)
	}
	if o.Upstream != "" {
		if _, err := os.Stat(o.Upstream); err != nil {
			return nil, fmt.Errorf("--upstream-nex: %w", err)
		}
	}
	if o.Workload != "sh" && o.Workload != "nats" {
		return nil, fmt.Errorf("workload %q: want sh or nats", o.Workload)
	}
	runID := strconv.Itoa(os.Getpid()) + "-" + strings.ToLower(nuid.Next()[:6])
	// What a killed run left (its nexd, nexlets, workloads, upstream node) would run
	// beside this one's and skew it: reaped first.
	reapDead(runID, o.Log)
	hold, err := holdRun(runID)
	if err != nil {
		return nil, err
	}
	// The temp dir is named for the run, so that a killed run's is reaped with the rest;
	// one kept (--keep) is not.
	pattern := runPrefix + runID + "-"
	if o.Keep {
		pattern = runPrefix + "keep-"
	}
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		hold.Release()
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	return &Harness{o: o, dir: dir, runID: runID, cg: cgroupV1Root(runID), hold: hold}, nil
}

// Dir is the run's temp directory (node logs are under it).
func (h *Harness) Dir() string { return h.dir }

// Close stops every node (SIGTERM, so each removes its cgroups) and server, then kills
// whatever is left in the run's cgroups (a node that did not stop in time, or its
// nexlet and workloads), removes the cgroup tree and, unless Keep, the temp dir. nexbench
// calls it on SIGINT and SIGTERM too.
func (h *Harness) Close() {
	h.stopAllNodes()
	h.mu.Lock()
	servers := h.nats
	h.nats = nil
	h.mu.Unlock()
	for _, s := range servers {
		s.Shutdown()
	}
	if killed, err := reapRun(h.runID, true); killed > 0 || err != nil {
		h.o.Log.Warn("killed what the run's nodes left", "killed", killed, "err", err)
	}
	h.hold.Release()
	if !h.o.Keep {
		_ = os.RemoveAll(h.dir)
	}
}

func (h *Harness) stopAllNodes() {
	h.mu.Lock()
	nodes := h.nodes
	h.nodes = nil
	h.mu.Unlock()
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Go(func() {
			if err := n.stop(60 * time.Second); err != nil {
				h.o.Log.Warn("stop node", "err", err)
			}
		})
	}
	wg.Wait()
}

// natsServer starts an in-process server owned by the harness.
func (h *Harness) natsServer() (*natsServer, error) {
	h.mu.Lock()
	h.seq++
	dir := filepath.Join(h.dir, fmt.Sprintf("nats-%d", h.seq))
	h.mu.Unlock()
	s, err := startNATS(dir, nil)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.nats = append(h.nats, s)
	h.mu.Unlock()
	return s, nil
}

func (h *Harness) natsCluster(size int) ([]*natsServer, error) {
	h.mu.Lock()
	h.seq++
	dir := filepath.Join(h.dir, fmt.Sprintf("cluster-%d", h.seq))
	h.mu.Unlock()
	ss, err := startCluster(dir, size)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.nats = append(h.nats, ss...)
	h.mu.Unlock()
	return ss, nil
}

// node starts a nexd in a fresh directory (or dir, when given, to restart one).
func (h *Harness) node(spec nodeSpec) (*nodeProc, error) {
	h.mu.Lock()
	h.seq++
	if spec.Dir == "" {
		spec.Dir = filepath.Join(h.dir, fmt.Sprintf("node-%d", h.seq))
	}
	if spec.Name == "" {
		spec.Name = fmt.Sprintf("bench%d", h.seq)
	}
	h.mu.Unlock()
	if spec.Nexd == "" {
		spec.Nexd = h.o.Nexd
	}
	spec.Extra = append(slices.Clone(h.o.NexdArgs), spec.Extra...)
	if h.cg != "" && spec.CgroupV1 == "" {
		spec.CgroupV1 = filepath.Join(h.cg, filepath.Base(spec.Dir))
	}
	n, err := startNode(spec)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.nodes = append(h.nodes, n)
	h.mu.Unlock()
	return n, nil
}

// readyNode starts a node and waits for READY=1.
func (h *Harness) readyNode(ctx context.Context, spec nodeSpec) (*nodeProc, time.Duration, error) {
	n, err := h.node(spec)
	if err != nil {
		return nil, 0, err
	}
	d, err := n.waitReady(ctx, 60*time.Second)
	if err != nil {
		return nil, 0, err
	}
	return n, d, nil
}

// stopNode stops one node and forgets it.
func (h *Harness) stopNode(n *nodeProc) error {
	h.mu.Lock()
	for i, m := range h.nodes {
		if m == n {
			h.nodes = append(h.nodes[:i], h.nodes[i+1:]...)
			break
		}
	}
	h.mu.Unlock()
	return n.stop(60 * time.Second)
}

func (h *Harness) workload() workloadSpec { return workloadSpec{Kind: h.o.Workload, Self: h.o.Self} }

// waitBids polls auctions until want nodes bid: nexd is READY once its nexlet
// registered, but interest may take a moment to reach every server of a cluster.
func waitBids(ctx context.Context, c *client, want int) error {
	deadline := time.Now().Add(60 * time.Second)
	got := 0
	for time.Now().Before(deadline) {
		bids, _ := c.auction(ctx, gatherOpts{first: time.Second, stall: 200 * time.Millisecond, max: want})
		if got = len(bids); got >= want {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("only %d of %d nodes bid within 60s", got, want)
}

// Run runs the named scenarios (or all) and returns the report.
func (h *Harness) Run(ctx context.Context, names []string) (*Report, error) {
	rep := &Report{Started: time.Now(), Host: HostInfo{CPUs: runtime.NumCPU(), Load1Before: load1()}}
	if len(names) == 1 && names[0] == "all" {
		names = Scenarios()
	}
	for _, name := range names {
		fn := h.scenario(name)
		if fn == nil {
			return nil, fmt.Errorf("unknown scenario %q (want one of %s, compare, or all)", name, strings.Join(Scenarios(), ", "))
		}
	}
	if len(h.o.Servers) == 0 {
		rep.Host.NexdVersion = nexdVersion(h.o.Nexd)
	}
	for _, name := range names {
		if ctx.Err() != nil {
			break
		}
		h.o.Log.Info("scenario", "name", name)
		start := time.Now()
		rs, err := h.scenario(name)(ctx)
		if err != nil {
			rs = append(rs, Result{Scenario: name, Err: err.Error()})
		}
		h.o.Log.Info("scenario done", "name", name, "took", time.Since(start).Round(time.Millisecond), "err", err)
		rep.Results = append(rep.Results, rs...)
		// Each scenario starts from a clean machine.
		h.stopAllNodes()
	}
	rep.Duration = time.Since(rep.Started).Round(time.Second).String()
	rep.Host.Load1After = load1()
	return rep, ctx.Err()
}

func (h *Harness) scenario(name string) func(context.Context) ([]Result, error) {
	switch name {
	case "ready":
		return h.ready
	case "control":
		return h.control
	case "placement":
		return h.placement
	case "throughput":
		return h.throughput
	case "footprint":
		return h.footprint
	case "recovery":
		return h.recovery
	case "fleet":
		return h.fleet
	case "compare":
		return h.compare
	}
	return nil
}

func load1() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

func nexdVersion(path string) string {
	out, err := execOutput(path, "--version")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
}

var errNoServers = errors.New("this scenario starts its own nodes; it cannot run against --nats.servers")
