package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

// topRow is one workload in nexctl top.
type topRow struct {
	ID, Name, Namespace, State string
	CPU                        float64 // percent of one CPU over the last interval; -1 unknown
	Memory, MemoryMax          uint64
	HasMemory                  bool
	Restarts                   int
	Uptime                     time.Duration
}

// topSorts are the --sort keys; each orders the most interesting first.
var topSorts = map[string]func(a, b topRow) bool{
	"cpu":      func(a, b topRow) bool { return a.CPU > b.CPU },
	"mem":      func(a, b topRow) bool { return a.Memory > b.Memory },
	"restarts": func(a, b topRow) bool { return a.Restarts > b.Restarts },
	"uptime":   func(a, b topRow) bool { return a.Uptime > b.Uptime },
	"name":     func(a, b topRow) bool { return a.Name < b.Name },
	"state":    func(a, b topRow) bool { return a.State < b.State },
}

func topSortNames() []string {
	out := make([]string, 0, len(topSorts))
	for k := range topSorts {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// localTopRows turns two samples of the local node's workloads, dt apart, into rows.
func localTopRows(prev, cur []control.Workload, dt time.Duration, now time.Time) []topRow {
	before := map[string]time.Duration{}
	for _, w := range prev {
		before[w.ID] = w.CPU.Std()
	}
	rows := make([]topRow, 0, len(cur))
	for _, w := range cur {
		r := topRow{ID: w.ID, Name: w.Name, Namespace: w.Namespace, State: w.State, CPU: -1,
			Memory: w.MemoryBytes, MemoryMax: w.MemoryMax, HasMemory: true, Restarts: w.Restarts}
		if !w.StartTime.IsZero() && !ended(w.State) {
			r.Uptime = now.Sub(w.StartTime)
		}
		if b, ok := before[w.ID]; ok && dt > 0 {
			r.CPU = 100 * float64(w.CPU.Std()-b) / float64(dt)
			if r.CPU < 0 {
				r.CPU = 0
			}
		}
		rows = append(rows, r)
	}
	return rows
}

// remoteTopRows turns two listings of a remote node's workloads, dt apart, into rows:
// a nexd node adds its cgroup figures (protocol.WorkloadResources), others give none.
func remoteTopRows(prev, cur []protocol.WorkloadSummary, dt time.Duration, now time.Time) []topRow {
	before := map[string]uint64{}
	for _, w := range prev {
		if w.Resources != nil {
			before[w.ID] = w.Resources.CPUUsageNsec
		}
	}
	rows := make([]topRow, 0, len(cur))
	for _, w := range cur {
		r := topRow{ID: w.ID, Name: w.Name, Namespace: deref(w.Namespace), State: string(w.WorkloadState), CPU: -1}
		r.Restarts, _ = strconv.Atoi(w.Metadata["restarts"])
		if t, err := time.Parse(time.RFC3339, w.StartTime); err == nil && !ended(r.State) {
			r.Uptime = now.Sub(t)
		}
		if res := w.Resources; res != nil {
			r.Memory, r.MemoryMax, r.HasMemory = res.MemoryBytes, res.MemoryMax, true
			if b, ok := before[w.ID]; ok && dt > 0 {
				r.CPU = max(0, 100*float64(int64(res.CPUUsageNsec-b))/float64(dt))
			}
		}
		rows = append(rows, r)
	}
	return rows
}

// renderTop prints rows sorted by key as an aligned plain table (no escape codes).
// partial, when set, says which workloads the figures lack (a partial list).
func renderTop(w io.Writer, title string, rows []topRow, key, partial string) error {
	less := topSorts[key]
	sort.SliceStable(rows, func(i, j int) bool {
		if less(rows[i], rows[j]) != less(rows[j], rows[i]) {
			return less(rows[i], rows[j])
		}
		return rows[i].ID < rows[j].ID
	})
	var b strings.Builder
	fmt.Fprintf(&b, "%s — %d workload(s), sorted by %s\n", title, len(rows), key)
	if partial != "" {
		fmt.Fprintf(&b, "PARTIAL: %s; their workloads are not in the figures\n", partial)
	}
	fmt.Fprintf(&b, "%-24s %-16s %-10s %-9s %6s %21s %8s %12s\n", "ID", "NAME", "NAMESPACE", "STATE", "CPU%", "MEMORY / LIMIT", "RESTARTS", "UPTIME")
	for _, r := range rows {
		cpu := "-"
		if r.CPU >= 0 {
			cpu = strconv.FormatFloat(r.CPU, 'f', 1, 64)
		}
		mem := "-"
		if r.HasMemory {
			lim := "none"
			if r.MemoryMax > 0 {
				lim = humanBytes(r.MemoryMax)
			}
			mem = humanBytes(r.Memory) + " / " + lim
		}
		fmt.Fprintf(&b, "%-24s %-16s %-10s %-9s %6s %21s %8d %12s\n", clip(r.ID, 24), clip(r.Name, 16), clip(orDash(r.Namespace), 10),
			clip(r.State, 9), cpu, mem, r.Restarts, uptimeText(r))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}

func (a *app) topCmd() *cobra.Command {
	var node, sortKey string
	var interval time.Duration
	var iterations int
	cmd := &cobra.Command{
		Use:   "top",
		Short: "Live view of a node's workloads: state, CPU, memory against its limit, restarts, uptime",
		Long: `Show this node's workloads (or with --node any node's), refreshed in place every
--interval like systemd-cgtop: state, CPU (percent of one CPU over the interval), memory
against its limit, restarts and uptime, sorted by --sort. A remote nexd node reads its
workloads' cgroups when asked (upstream nodes report no CPU or memory). When stdout is
not a terminal, top prints plain snapshots (-n of them, default 1) and exits.

A snapshot that lacks some nexlets' workloads (the node's list was partial) is marked
PARTIAL; top then exits 1 however it ends (its -n snapshots, or interrupted with
Ctrl-C), else 0.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, ok := topSorts[sortKey]; !ok {
				return usagef("--sort %q is not one of %s", sortKey, strings.Join(topSortNames(), ", "))
			}
			if interval <= 0 {
				return usagef("--interval must be positive")
			}
			tty := isTTY(a.out()) && !a.json
			if iterations == 0 && !tty {
				iterations = 1
			}
			sample, title, closeSource, err := a.topSource(cmd.Context(), node)
			if err != nil {
				return err
			}
			defer closeSource()
			ctx := cmd.Context()
			partials, taken := 0, 0
			prev, _, prevAt, err := sample(ctx, nil, 0)
			if err != nil {
				return err
			}
		loop:
			for iterations <= 0 || taken < iterations {
				select {
				case <-ctx.Done():
					break loop // interrupted (Ctrl-C): the end of an interactive top
				case <-time.After(interval):
				}
				now := time.Now()
				rows, partial, at, err := sample(ctx, prev, now.Sub(prevAt))
				if err != nil && ctx.Err() != nil {
					break loop // interrupted while sampling: that snapshot was never shown
				}
				if err != nil {
					return err
				}
				taken++
				if partial != "" {
					partials++
				}
				if a.json {
					if partial != "" {
						a.warnf("%s", partial)
					}
					if err := a.printJSON(rows); err != nil {
						return err
					}
				} else {
					if tty {
						fmt.Fprint(terminal(a.out()), "\x1b[H\x1b[2J") // its own: not escaped
					}
					if err := renderTop(a.out(), title, rows, sortKey, partial); err != nil {
						return err
					}
				}
				prev, prevAt = rows, at
			}
			// However it ended (its count, or interrupted), a run that showed a partial
			// snapshot exits 1, as workload list does for a partial fleet: a script or
			// an operator must not take its figures for the whole.
			if partials > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d of %d snapshot(s) were partial: some nexlets' workloads are missing from them", partials, taken)}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&node, "node", "", "another node (id, name or id prefix), over NATS")
	fl.StringVar(&sortKey, "sort", "cpu", "sort by "+strings.Join(topSortNames(), ", "))
	fl.DurationVar(&interval, "interval", time.Second, "refresh interval")
	fl.IntVarP(&iterations, "iterations", "n", 0, "stop after this many refreshes (default: until interrupted on a terminal, 1 otherwise)")
	_ = cmd.RegisterFlagCompletionFunc("sort", cobra.FixedCompletions(topSortNames(), cobra.ShellCompDirectiveNoFileComp))
	_ = cmd.RegisterFlagCompletionFunc("node", a.completeNodes())
	return cmd
}

// topSampler takes one sample; prev and dt (since prev) give CPU rates. partial says
// which nexlets' workloads the sample lacks ("" when it is whole).
type topSampler func(ctx context.Context, prev []topRow, dt time.Duration) (rows []topRow, partial string, at time.Time, err error)

// topSource picks the local control socket or, with --node, the fleet; close releases
// what it opened.
func (a *app) topSource(ctx context.Context, node string) (sample topSampler, title string, close func(), err error) {
	if node == "" {
		c := a.client()
		st, err := c.Status(ctx)
		if err != nil {
			c.Close()
			return nil, "", nil, err
		}
		var last []control.Workload
		return func(ctx context.Context, _ []topRow, dt time.Duration) ([]topRow, string, time.Time, error) {
			ws, err := c.Workloads(ctx)
			now := time.Now()
			partial := ""
			if p := (*control.PartialList)(nil); errors.As(err, &p) {
				partial = "the node could not list those of " + protocol.MissingText(p.Missing)
			} else if err != nil {
				return nil, "", now, err
			}
			rows := localTopRows(last, ws, dt, now)
			last = ws
			return rows, partial, now, nil
		}, fmt.Sprintf("%s (%s)", st.Name, shortID(st.NodeID)), c.Close, nil
	}
	f, done, err := a.connectFleet(ctx)
	if err != nil {
		return nil, "", nil, err
	}
	id, err := f.resolveNode(ctx, node)
	if err != nil {
		done()
		return nil, "", nil, err
	}
	var last []protocol.WorkloadSummary
	return func(ctx context.Context, _ []topRow, dt time.Duration) ([]topRow, string, time.Time, error) {
		now := time.Now()
		byNode, partial, err := f.workloadSummariesByNode(ctx, id)
		if err != nil {
			return nil, "", now, err
		}
		rows := remoteTopRows(last, byNode[id], dt, now)
		last = byNode[id]
		what := ""
		if p := partial[id]; p != nil {
			what = p.Error()
		}
		return rows, what, now, nil
	}, "node " + shortID(id), done, nil
}

// uptimeText is a row's uptime, "-" for a workload that no longer runs.
func uptimeText(r topRow) string {
	if ended(r.State) {
		return "-"
	}
	return friendlyDuration(r.Uptime)
}
