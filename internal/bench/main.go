package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

const usage = `Usage: nexbench [flags] SCENARIO... | all
       nexbench compare --upstream-nex PATH
       nexbench workload

Scenarios: ready, control, placement, throughput, footprint, recovery, fleet.
nexbench starts nexd processes (--nexd) and in-process NATS servers on loopback, speaks
only the $NEX protocol to the nodes (the control scenario uses the control socket) and
removes everything it started when done, or on SIGINT and SIGTERM; what a run killed
with SIGKILL left running (found by its cgroups, nexbench-<pid>-<id>) the next run reaps. With --nats.servers it measures the nodes
already behind that server instead (placement and throughput only), nexd or upstream.
"nexbench compare" starts an upstream node (--upstream-nex, upstream's nex binary) and a
nexd, each on its own NATS server, and runs the same scenarios against both, alternating:
exec to ready, deploy request, placement, list, stop, idle and per-workload memory.
"nexbench workload" is the workload the tool deploys with --workload nats.

Flags:
`

// Main is nexbench's command line; it returns the exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == runtimeTmpfsCmd {
		return runtimeTmpfs(args[1:], stderr)
	}
	if len(args) > 0 && args[0] == floorStarterCmd {
		return runFloorStarter(args[1:], stderr)
	}
	if len(args) > 0 && args[0] == floorNodeCmd {
		return runFloorNode(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "workload" {
		if err := RunWorkload(ctx, os.Getenv); err != nil {
			fmt.Fprintln(stderr, "nexbench:", err)
			return 1
		}
		return 0
	}
	var o Options
	var asJSON, verbose bool
	var jsonOut string
	var timeout time.Duration
	fs := pflag.NewFlagSet("nexbench", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	fs.StringVar(&o.Nexd, "nexd", "./bin/nexd", "nexd binary to start")
	fs.StringVar(&o.Nexctl, "nexctl", "./bin/nexctl", "nexctl binary (fleet: node list latency)")
	fs.StringSliceVarP(&o.Servers, "nats.servers", "s", nil, "measure the nodes behind this NATS server instead of starting nexd (placement, throughput)")
	fs.StringVar(&o.Namespace, "namespace", "system", "namespace to deploy into")
	fs.StringVar(&o.Workload, "workload", "sh", "workload: sh (/bin/sh echoes a line seen on the $NEX log feed, then sleeps) or nats (this binary announces itself over NATS)")
	fs.BoolVar(&o.Quick, "quick", false, "smoke run: small counts")
	fs.IntVarP(&o.Placements, "placements", "n", 0, "placements per placement variant (default 500, quick 50)")
	fs.IntVar(&o.Target, "target", 0, "running workloads the throughput scenario reaches (default 1000, quick 100)")
	fs.IntSliceVar(&o.Clients, "clients", nil, "concurrent clients of the throughput scenario (default 1,8,32)")
	fs.DurationVar(&o.Stall, "stall", 0, "fixed auction stall of the non-early-return variants (default 20ms)")
	fs.IntVar(&o.Nodes, "nodes", 0, "nodes of the multi-node placement variant (default 10)")
	fs.IntSliceVar(&o.FleetSizes, "fleet-sizes", nil, "fleet sizes (default 1,10,50; quick 1,10)")
	fs.IntSliceVar(&o.Footprint, "footprint", nil, "workload counts of the footprint scenario (default 0,100,1000; quick 0,100)")
	fs.IntVar(&o.Recovery, "recovery", 0, "workloads of the recovery scenario (default 1000, quick 100)")
	fs.DurationVar(&o.Idle, "idle", 0, "idle CPU sampling window (default 5s, quick 2s)")
	fs.BoolVar(&o.Keep, "keep", false, "keep the temp dir with node logs")
	fs.StringVar(&o.Upstream, "upstream-nex", "", "upstream's nex binary (compare; with ready, upstream's starts alternate with nexd's)")
	fs.IntVar(&o.ReadyStarts, "ready-starts", 0, "starts per side of ready and of compare's exec to ready (default 5, quick 3)")
	fs.StringVar(&o.NexdB, "ab-nexd", "", "with ready: a second nexd binary whose starts alternate with --nexd's, one by one (A/B)")
	stateRecords := -1
	fs.IntVar(&stateRecords, "state-records", -1, "with ready --ab-nexd or --ab-env: each side keeps node state in KV (--state kv) under a node id of its own whose bucket holds this many workload records of a type no nexlet runs, stored as <type>_<id> (older nexd's layout; a start of each side, not timed, comes first) (0: an empty bucket; default: state in memory, a fresh node id each start)")
	fs.StringArrayVar(&o.EnvB, "ab-env", nil, "with ready: K=V in the environment of the B starts only (repeat; B is --nexd unless --ab-nexd)")
	fs.IntSliceVar(&o.CompareWorkloads, "compare-workloads", nil, "running-workload counts compare samples memory at (default 100)")
	fs.StringArrayVar(&o.NexdArgs, "nexd-arg", nil, "an argument added to every nexd started (repeat; e.g. --nexd-arg=--workload-uid-range=100000-199999)")
	fs.BoolVar(&o.RuntimeOnHost, "runtime-on-host", false, "compare: the measured nexd's runtime dir, /run/nex-workloads, /run/nex-dynamic-uid and /run/systemd/dynamic-uid stay on the host's file systems (default: tmpfs in a mount namespace of its own, as /run is on a systemd host; needs root)")
	fs.StringVar(&o.SamplesOut, "samples-out", "", "append each placement to this file: variant, start (Unix ns), auction, deploy request, process start and total (µs), tab-separated")
	fs.BoolVar(&asJSON, "json", false, "print the report as JSON")
	fs.StringVar(&jsonOut, "json-out", "", "also write the JSON report to this file")
	fs.BoolVarP(&verbose, "verbose", "v", false, "log progress to stderr")
	fs.DurationVar(&timeout, "timeout", 30*time.Minute, "bound on the whole run")
	if err := fs.Parse(args); err != nil {
		if err == pflag.ErrHelp {
			return 0
		}
		fmt.Fprintln(stderr, "nexbench:", err)
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if stateRecords >= 0 {
		o.ReadyStateKV, o.StateRecords = true, stateRecords
	}
	for _, kv := range o.EnvB {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			fmt.Fprintf(stderr, "nexbench: --ab-env %q: want KEY=VALUE\n", kv)
			return 2
		}
	}
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelInfo
	}
	o.Log = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(stderr, "nexbench: own path:", err)
		return 1
	}
	o.Self = self
	h, err := NewHarness(o)
	if err != nil {
		fmt.Fprintln(stderr, "nexbench:", err)
		return 1
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	rep, err := h.Run(ctx, fs.Args())
	if rep == nil {
		fmt.Fprintln(stderr, "nexbench:", err)
		return 2
	}
	rep.Command = "nexbench " + strings.Join(args, " ")
	if jsonOut != "" {
		if f, ferr := os.Create(jsonOut); ferr != nil {
			fmt.Fprintln(stderr, "nexbench:", ferr)
		} else {
			_ = rep.WriteJSON(f)
			f.Close()
		}
	}
	if asJSON {
		_ = rep.WriteJSON(stdout)
	} else {
		_ = rep.WriteTable(stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "nexbench:", err)
		return 1
	}
	for _, r := range rep.Results {
		if r.Err != "" {
			return 1
		}
	}
	return 0
}
