package cli

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/protocol"
)

// connectFleet opens NATS and returns a fleet client; close it when done.
// deployWait bounds one ADEPLOY: longer than a node's default deploy_timeout, so the
// node's own answer (started, or stopped again) normally comes first.
const deployWait = 5*time.Minute + 30*time.Second

// deployMaxWait bounds a deploy whose node keeps reporting progress (an artifact's
// download): each report starts deployWait again, up to this long after the request.
const deployMaxWait = time.Hour

// A deploy asks the node to say it is alive every deployAliveEvery; deploySilence
// without a word means the node went away mid-request (outcome unknown, exit 3).
const (
	deployAliveEvery = time.Second
	deploySilence    = 10 * time.Second
)

func (a *app) connectFleet(ctx context.Context) (*fleet, func(), error) {
	if a.stall <= 0 {
		return nil, nil, usagef("--gather-stall must be positive")
	}
	r := a.resolved()
	if r.NATS.Timeout <= 0 {
		return nil, nil, usagef("--nats.timeout must be positive")
	}
	if r.Err != nil {
		return nil, nil, r.Err
	}
	if err := r.useLocalNode(ctx); err != nil {
		return nil, nil, err
	}
	c, err := connectNATS(ctx, r.NATS)
	if err != nil {
		return nil, nil, r.explainDenied(err)
	}
	f := &fleet{nc: c.NC, ns: a.namespace, first: r.NATS.Timeout, stall: a.stall, deployTimeout: deployWait, deployMax: deployMaxWait, stopWait: stopWait, aliveEvery: deployAliveEvery, silence: deploySilence, jsDomain: c.JSDomain(),
		progress: a.newDeployProgress(), violation: c.NextViolation, cut: a.noteCut, warn: a.warnf}
	if a.verbose {
		f.debug = a.debugf
	}
	if len(r.TrustedNodes) > 0 {
		f.trusted, f.allowUnsigned = map[string]bool{}, a.allowUnsigned
		for _, id := range r.TrustedNodes {
			f.trusted[id] = true
		}
	}
	return f, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c.Close(ctx)
	}, nil
}

// warnf prints a warning on stderr: a line for people, {"warning": "..."} under --json.
func (a *app) warnf(format string, args ...any) { a.stderrLine("warning", format, args...) }

// debugf prints, under --verbose, what nexctl is doing and why on stderr: a line
// "nexctl: debug: ...", or {"debug": "..."} under --json.
func (a *app) debugf(format string, args ...any) { a.stderrLine("debug", format, args...) }

// stderrLine prints "nexctl: kind: message" on stderr, {"kind": "message"} under --json.
func (a *app) stderrLine(kind, format string, args ...any) {
	msg := clipMessage(fmt.Sprintf(format, args...), maxWarning)
	if a.json {
		b, _ := json.Marshal(map[string]string{kind: msg})
		fmt.Fprintln(a.io.Stderr, string(b))
		return
	}
	fmt.Fprintf(a.io.Stderr, "nexctl: %s: %s\n", kind, msg)
}

// maxWarning and maxError bound a warning (or debug line) and the error nexctl ends
// with: their text quotes what nodes said (an error answer, the node id a reply
// claims), which anyone who answers may make a megabyte long. Before, the 20 unusable
// answers a list names put 6 MB on the operator's terminal.
const (
	maxWarning = 4 << 10
	maxError   = 16 << 10
)

// clipMessage is s cut to at most max bytes (at a rune's start), saying how many were
// left off.
func clipMessage(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s… (%d bytes left off)", s[:cut], len(s)-cut)
}

// note prints a line for people on stderr, not under --json (whose result says it).
func (a *app) note(format string, args ...any) {
	if !a.json {
		fmt.Fprintf(a.io.Stderr, format, args...)
	}
}

// warnAll prints replies that could not be used, so a bad node does not pass unseen;
// the first maxWarned of them, then how many more (a flood of bad answers would
// otherwise be a flood of lines).
func (a *app) warnAll(errs []error) {
	i := 0
	for j, err := range errs {
		if u := (*unsignedRows)(nil); errors.As(err, &u) {
			a.warnf("%v", u) // rows taken, not ignored
			continue
		}
		if i == maxWarned {
			a.warnf("ignoring %d more replies that could not be used", len(errs)-j)
			return
		}
		i++
		a.warnf("ignoring a reply: %v", err)
	}
}

// maxWarned is how many unusable replies warnAll names one by one.
const maxWarned = 20

func (a *app) nodeCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "node",
		Aliases: []string{"nodes"},
		Short:   "List, inspect and drain nodes across the fleet",
		Args:    cobra.ArbitraryArgs,
		RunE:    groupRun,
	}
	cmd.AddCommand(a.nodeListCmd(), a.nodeInfoCmd(), a.nodeLameduckCmd(), a.nodeStateCmd(), a.nodeReexecCmd())
	return cmd
}

func (a *app) nodeListCmd() *cobra.Command {
	filter := newKV("filter")
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the nodes that answer a ping, optionally only those with matching tags",
		Long: `List the nodes that answer a ping. The ping ends when answers stop arriving
(--gather-stall after the last one) or, when none arrive, after --nats.timeout.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			nodes, unsigned, bad, err := f.pingNodesSigned(cmd.Context(), filter.m, f.gatherOpts(0))
			if err != nil {
				return err
			}
			if unsigned != nil {
				bad = append(bad, unsigned)
			}
			a.warnAll(bad)
			if a.json {
				if nodes == nil {
					nodes = []protocol.NodePingResponse{}
				}
				return a.printJSON(nodes)
			}
			return renderNodeList(a.out(), nodes, time.Now())
		},
	}
	cmd.Flags().Var(filter, "filter", "only nodes with this tag (repeatable; all must match)")
	return cmd
}

func (a *app) nodeInfoCmd() *cobra.Command {
	var full bool
	cmd := &cobra.Command{
		Use:               "info NODE",
		Short:             "Show one node's tags, xkey, uptime, version and nexlets",
		Long:              "Show one node's tags, xkey, uptime, version and nexlets, and for a nexd node the auctions it did not bid on since it started, by reason. NODE is its id, name or a unique prefix of its id.",
		Args:              exactArgs(1, "NODE"),
		ValidArgsFunction: a.completeNodes(),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			id, err := f.resolveNode(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			info, err := f.nodeInfo(cmd.Context(), id)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(info)
			}
			return renderNodeInfo(a.out(), info, full, time.Now())
		},
	}
	cmd.Flags().BoolVar(&full, "full", false, "show every detail of each nexlet")
	return cmd
}

func (a *app) nodeLameduckCmd() *cobra.Command {
	var wait, migrate bool
	var nodeID string
	var delay time.Duration
	tag := newKV("tag")
	cmd := &cobra.Command{
		Use:     "lameduck [NODE]",
		Aliases: []string{"down"},
		Short:   "Drain a node (or every node with --tag): stop bidding now, stop workloads after --delay",
		Long: `Put a node in lame duck mode: it stops taking workloads at once and stops its
workloads after --delay. Name the node positionally or with --node-id, by its id, name or
a unique prefix of its id. With --tag and no node id, every node whose tags match is
drained.

--wait follows the drain: the workloads left on each node (a bar per node on a terminal,
a line per change otherwise) until each node has none left after its delay or has shut
down. It exits 1 if a workload ignored SIGTERM and was killed at the end of its stop
grace (seen in WORKLOADSTOPPED events: nodes need events = "nats"). A nexd node tells
--wait its drain's outcome, signed with its node key: drained (exit 0), or failed with
its reason (exit 1); a node that stops without telling it (killed, or its NATS link
lost) is not known to be drained (exit 1). For other (upstream) nodes, a node whose
list is partial (a nexlet did not answer it) is never counted drained: --wait keeps
waiting, and exits 1 if the node stops while its last list was partial.

--migrate first re-places each service of a drained node: a normal auction in its
namespace (the draining node no longer bids), and the old copy is stopped only once the
new one reports started. Jobs and functions are left to finish or be stopped at the end
of --delay, which should leave time for the migration.`,
		Args:              rangeArgs(0, 1, "NODE"),
		ValidArgsFunction: a.completeNodes(),
		RunE: func(cmd *cobra.Command, args []string) error {
			plan, err := planLameduck(args, nodeID, delay, tag.m)
			if err != nil {
				return err
			}
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			var matching []protocol.NodePingResponse
			if plan.ByTag {
				nodes, bad, err := f.pingNodes(cmd.Context(), tag.m, f.gatherOpts(0))
				if err != nil {
					return err
				}
				a.warnAll(bad)
				matching = nodes
			}
			if !plan.ByTag {
				if plan.NodeID, err = f.resolveNode(cmd.Context(), plan.NodeID); err != nil {
					return err
				}
			}
			ids, err := plan.targets(matching)
			if err != nil {
				return err
			}
			type result struct {
				NodeID  string `json:"node_id"`
				Success bool   `json:"success"`
				Message string `json:"message"`
				Until   string `json:"until,omitempty"`
				Drained bool   `json:"drained,omitempty"` // --wait
				Killed  int    `json:"killed,omitempty"`  // --wait
				// --wait, from a node that tells its drain's outcome (nexd): drained,
				// failed (with the node's reason) or unknown (it stopped without a word).
				Outcome string `json:"outcome,omitempty"`
				Reason  string `json:"reason,omitempty"`
			}
			var results []result
			var owners map[string]string // workload id -> node id, for --wait
			if wait {
				byNode, err := f.workloadsByNode(cmd.Context())
				if err != nil {
					return err
				}
				owners = map[string]string{}
				for node, ws := range byNode {
					for _, w := range ws {
						owners[w] = node
					}
				}
			}
			var drain []*drainNode
			failed := 0
			for _, id := range ids {
				untilT := time.Now().Add(delay)
				until := untilT.Format(time.RFC3339)
				var r protocol.LameduckResponse
				var tell *drainTell
				if wait {
					// A nexd node tells its drain's outcome on the inbox this opens.
					r, tell, err = f.lameduckTold(cmd.Context(), id, delay, tag.m)
					defer tell.close()
				} else {
					r, err = f.lameduck(cmd.Context(), id, delay, tag.m)
				}
				res := result{NodeID: id, Success: err == nil && r.Success, Message: r.Message}
				if err != nil {
					res.Message = err.Error()
				}
				if res.Success {
					res.Until = until
					drain = append(drain, &drainNode{ID: id, Until: untilT, Start: -1, tell: tell})
				} else {
					failed++
				}
				results = append(results, res)
				if !a.json {
					if res.Success {
						fmt.Fprintf(a.out(), "Node %s successfully commanded into lame duck mode. Workloads will begin shutting down at %s\n", id, until)
					} else {
						fmt.Fprintf(a.io.Stderr, "nexctl: node %s failed to enter lame duck mode: %s\n", id, orDash(res.Message))
					}
				}
			}
			migrateFailed := 0
			if migrate {
				migrateFailed = a.migrateServices(cmd.Context(), f, drain)
			}
			killed, partial, drainFailed, unknown := 0, 0, 0, 0
			if wait && len(drain) > 0 {
				if err := a.watchDrain(cmd.Context(), f, drain, owners, a.out()); err != nil {
					return err
				}
				for _, d := range drain {
					for i := range results {
						if results[i].NodeID == d.ID {
							results[i].Drained, results[i].Killed = d.drained(), d.Killed
							if d.Told {
								results[i].Outcome, results[i].Reason = cmp.Or(d.Outcome, "unknown"), d.Reason
							}
						}
					}
					killed += d.Killed
					if n, err := d.tell.refused(); n > 0 {
						a.warnf("ignored %d drain outcome(s) for node %s that it did not sign: %v", n, d.label(), err)
					}
					switch {
					case d.Told && d.Outcome == protocol.DrainFailed:
						drainFailed++
						a.note("nexctl: node %s: drain failed: %s\n", d.label(), d.Reason)
					case d.unknown():
						unknown++
						a.note("nexctl: node %s stopped without telling its drain's outcome (killed, or its NATS connection lost); its workloads may still run\n", d.label())
					case d.Partial != "":
						partial++
						a.note("nexctl: node %s stopped on a partial list: missing those of %s; their workloads may still run\n", d.label(), d.Partial)
					}
				}
			}
			if a.json {
				var out any = results
				if !plan.ByTag {
					out = results[0]
				}
				if err := a.printJSON(out); err != nil {
					return err
				}
			}
			if failed > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d of %d node(s) did not enter lame duck mode", failed, len(ids))}
			}
			if killed > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d workload(s) ignored SIGTERM and were killed at the end of their stop grace", killed)}
			}
			if drainFailed > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d node(s) failed their drain", drainFailed)}
			}
			if unknown+partial > 0 {
				var why []string
				if partial > 0 {
					why = append(why, fmt.Sprintf("%d node(s) not known to be drained: their last list was partial", partial))
				}
				if unknown > 0 {
					why = append(why, fmt.Sprintf("%d node(s) not known to be drained: they stopped without telling their drain's outcome", unknown))
				}
				return exitError{ExitFailed, errors.New(strings.Join(why, "; "))}
			}
			if migrateFailed > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d service(s) could not be migrated (a nexlet whose services its node could not list, or a node that answered the list with an error, counts as one)", migrateFailed)}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&wait, "wait", false, "follow the drain until every node is drained; exit 1 if a workload had to be killed or a drain failed or is not known")
	fl.BoolVar(&migrate, "migrate", false, "first re-place each service elsewhere through a new auction, stopping the old copy once the new one runs")
	fl.StringVar(&nodeID, "node-id", "", "the node to drain (same as the positional NODE_ID)")
	_ = cmd.RegisterFlagCompletionFunc("node-id", a.completeNodes())
	fl.DurationVar(&delay, "delay", time.Minute, "how long workloads keep running before they are stopped")
	fl.Var(tag, "tag", "only a node with this tag; without a node id, every node with it")
	return cmd
}

// migrateServices re-places every service of the draining nodes (which no longer bid)
// and stops each old copy once its new one runs, printing each step. It returns how
// many services could not be migrated, counting each nexlet of a draining node whose
// workloads the node could not list (partial), and a node that answered the list with
// an error, as one: its services stop with the drain.
func (a *app) migrateServices(ctx context.Context, f *fleet, nodes []*drainNode) int {
	byNode, partial, err := f.workloadSummariesByNode(ctx, "")
	if err != nil {
		fmt.Fprintf(a.io.Stderr, "nexctl: migrate: listing workloads: %v\n", err)
		return 1
	}
	failed := 0
	for _, n := range nodes {
		if p := partial[n.ID]; p != nil {
			failed += max(len(p.Missing), p.MissingCount, 1)
			fmt.Fprintf(a.io.Stderr, "nexctl: migrate: %v; their services are not migrated and stop with the drain\n", p)
		}
		for _, w := range byNode[n.ID] {
			if w.WorkloadLifecycle != string(protocol.LifecycleService) || w.WorkloadState != protocol.WorkloadRunning {
				continue
			}
			p, stopped, stopErr, err := a.cloneWorkload(ctx, f, w.ID, nil, true)
			switch {
			case err != nil:
				failed++
				fmt.Fprintf(a.io.Stderr, "nexctl: migrate %s [%s] off node %s: %v; it stops with the drain\n", w.Name, w.ID, n.ID, err)
			case stopErr != nil:
				failed++
				fmt.Fprintf(a.io.Stderr, "nexctl: migrate %s: %v\n", w.Name, stopErr)
			case !a.json:
				fmt.Fprintf(a.out(), "Migrated %s [%s] to node %s as [%s]; old copy stopped: %t\n", w.Name, w.ID, p.Node, p.ID, stopped)
			}
		}
	}
	return failed
}

// nodeIDPattern is a node's public server nkey.
var nodeIDPattern = regexp.MustCompile(`^N[A-Z2-7]{55}$`)

func (a *app) nodeStateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "state [NODE]",
		Short: "List the workload entries in a node's KV state bucket nex-<node id>",
		Long: `List the entries of a node's KV state bucket (nex-<node id>). NODE is a node id, name
or unique id prefix; without it the local node's id is read from the control socket.
Each record is checked as the node checks one before it replays it: a record the node
skips is shown "BAD, not replayed" with the field at fault (--json: "refused").`,
		Args:              rangeArgs(0, 1, "NODE"),
		ValidArgsFunction: a.completeNodes(),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := ""
			// The local node's status, when it answers: its tombstones mark entries.
			c := a.client()
			local, lerr := c.Status(cmd.Context())
			c.Close()
			if len(args) == 1 {
				id = args[0]
			} else {
				if lerr != nil {
					return fmt.Errorf("no NODE_ID given and the local node's id is unknown: %w", lerr)
				}
				id = local.NodeID
			}
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			if id, err = f.resolveNode(cmd.Context(), id); err != nil {
				return err
			}
			entries, err := listStateEntries(cmd.Context(), f, id)
			if err != nil {
				return err
			}
			if lerr == nil && local.NodeID == id {
				markTombstoned(entries, local.Tombstones)
			}
			bad := 0
			for _, e := range entries {
				if e.Refused != nil {
					bad++
				}
			}
			if bad > 0 {
				fmt.Fprintf(a.io.Stderr, "nexctl: %d of %d records in nex-%s cannot be replayed: the node skips them (and warns at each read); mend or remove them (nats kv)\n", bad, len(entries), id)
			}
			if a.json {
				return a.printJSON(entries)
			}
			if len(entries) == 0 {
				fmt.Fprintf(a.out(), "No entries in nex-%s\n", id)
				return nil
			}
			rows := make([][]string, 0, len(entries))
			now := time.Now()
			for _, e := range entries {
				removal := "--"
				if e.TombstonedSince != nil {
					removal = "STOPPED, removal pending for " + friendlyDuration(now.Sub(*e.TombstonedSince)) + " (tombstone)"
				}
				record := "ok"
				if r := e.Refused; r != nil {
					record = "BAD, not replayed: " + r.Error
					if r.Field != "" {
						record = fmt.Sprintf("BAD, not replayed: field %q: %s", r.Field, r.Error)
					}
				}
				rows = append(rows, []string{e.Key, fmt.Sprint(e.Revision), e.Created.Format(time.RFC3339), humanBytes(uint64(e.Size)), removal, record})
			}
			return table(a.out(), "State of node "+id, []string{"Key", "Revision", "Created", "Size", "Removal", "Record"}, rows)
		},
	}
	var dryRun bool
	prune := &cobra.Command{
		Use:   "prune",
		Short: "Remove the state buckets of node ids that no longer answer a ping",
		Long: `Remove the KV state buckets (nex-<node id>) of nodes that do not answer a ping.
A node that is only briefly disconnected loses its replay state, so check with --dry-run
first.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			stale, err := staleStateBuckets(cmd.Context(), f)
			if err != nil {
				return err
			}
			js, err := f.jetstream()
			if err != nil {
				return err
			}
			var removed []string
			var errs []error
			for _, b := range stale {
				if !dryRun {
					if err := js.DeleteKeyValue(cmd.Context(), b); err != nil {
						errs = append(errs, fmt.Errorf("delete bucket %s: %w", b, err))
						continue
					}
				}
				removed = append(removed, b)
			}
			if a.json {
				if removed == nil {
					removed = []string{}
				}
				if err := a.printJSON(map[string]any{"removed": removed, "dry_run": dryRun}); err != nil {
					return err
				}
			} else {
				verb := "Removed"
				if dryRun {
					verb = "Would remove"
				}
				if len(removed) == 0 {
					fmt.Fprintln(a.out(), "No stale state buckets")
				}
				for _, b := range removed {
					fmt.Fprintf(a.out(), "%s %s\n", verb, b)
				}
			}
			return errors.Join(errs...)
		},
	}
	prune.Flags().BoolVar(&dryRun, "dry-run", false, "only list what would be removed")
	cmd.AddCommand(prune)
	return cmd
}

type stateEntry struct {
	Key      string    `json:"key"`
	Revision uint64    `json:"revision"`
	Created  time.Time `json:"created"`
	Size     int       `json:"size"`
	// TombstonedSince: the workload was stopped and its removal from the bucket failed
	// at this time; a tombstone on its node keeps it out of replays until a retried
	// removal succeeds (known for the local node only).
	TombstonedSince *time.Time `json:"tombstoned_since,omitempty"`
	// Refused: the record fails the checks the node applies before it replays one
	// (state.CheckReadBack), so the node skips it; nil for a record it replays.
	Refused *recordFault `json:"refused,omitempty"`
}

// recordFault is why the node refuses a record: the field of its value ("" for the
// key or the value as a whole) and what is wrong.
type recordFault struct {
	Field string `json:"field,omitempty"`
	Error string `json:"error"`
}

// checkRecord is the node's check of a record read back (state.CheckReadBack), as a
// fault to show: nil for a record the node replays.
func checkRecord(bucket, key string, value []byte, maxValue int) *recordFault {
	_, err := state.CheckReadBack(bucket, key, value, maxValue)
	if err == nil {
		return nil
	}
	var re *state.RecordError
	if errors.As(err, &re) {
		return &recordFault{Field: re.Field, Error: re.Err.Error()}
	}
	return &recordFault{Error: err.Error()}
}

// markTombstoned marks the entries (keys <type>.<id>, or an older nexd's <type>_<id>)
// that a tombstone stands in for.
func markTombstoned(entries []stateEntry, ts []control.Tombstone) {
	type workload struct{ typ, id string }
	since := make(map[workload]time.Time, len(ts))
	for _, t := range ts {
		since[workload{t.Type, t.ID}] = t.Since
	}
	for i := range entries {
		typ, id, ok := state.SplitKey(entries[i].Key)
		if at, found := since[workload{typ, id}]; ok && found {
			entries[i].TombstonedSince = &at
		}
	}
}

func listStateEntries(ctx context.Context, f *fleet, nodeID string) ([]stateEntry, error) {
	js, err := f.jetstream()
	if err != nil {
		return nil, err
	}
	bucket := "nex-" + nodeID
	// A user without JetStream grants (a tenant's) is told so at once, not after
	// the API's timeout (e2e TestTenantNodeStateRefused).
	ctx, stop := f.refusable(ctx, f.jsAPIPrefix())
	entries, err := readStateEntries(ctx, js, bucket, nodeID)
	if refused := stop(); refused != nil {
		return nil, jsRefused("read the state bucket "+bucket, refused)
	}
	return entries, err
}

// readStateEntries is listStateEntries' reading of bucket.
func readStateEntries(ctx context.Context, js jetstream.JetStream, bucket, nodeID string) ([]stateEntry, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("node %s has no state bucket %s (is its state kept in KV?)", nodeID, bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("open state bucket %s: %w", bucket, err)
	}
	// The bucket's value limit, as the node reads it (state.OpenKV): a record past it
	// is refused.
	maxValue := -1
	if st, err := kv.Status(ctx); err != nil {
		return nil, fmt.Errorf("status of %s: %w", bucket, err)
	} else if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok && bs.Config().MaxValueSize > 0 {
		maxValue = int(bs.Config().MaxValueSize)
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", bucket, err)
	}
	entries := []stateEntry{}
	for k := range keys.Keys() {
		if state.IsProbeKey(k) {
			continue
		}
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read %s/%s: %w", bucket, k, err)
		}
		entries = append(entries, stateEntry{Key: k, Revision: e.Revision(), Created: e.Created(), Size: len(e.Value()),
			Refused: checkRecord(bucket, k, e.Value(), maxValue)})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Key < entries[j].Key })
	return entries, nil
}

// staleStateBuckets lists nex-<node id> buckets whose node does not answer a ping sent
// to it by id. Only "no responders" counts as gone: a node that is slow to answer keeps
// its state.
func staleStateBuckets(ctx context.Context, f *fleet) ([]string, error) {
	js, err := f.jetstream()
	if err != nil {
		return nil, err
	}
	lctx, stop := f.refusable(ctx, f.jsAPIPrefix())
	names := js.KeyValueStoreNames(lctx)
	var buckets []string
	for n := range names.Name() {
		if id, ok := strings.CutPrefix(n, "nex-"); ok && nodeIDPattern.MatchString(id) {
			buckets = append(buckets, n)
		}
	}
	if refused := stop(); refused != nil {
		return nil, jsRefused("list the KV buckets", refused)
	}
	if err := names.Error(); err != nil {
		return nil, fmt.Errorf("list KV buckets: %w", err)
	}
	var stale []string
	for _, b := range buckets {
		id := strings.TrimPrefix(b, "nex-")
		_, ok, err := f.request(ctx, protocol.PingNodeSubject(id), protocol.NodePingRequest{}, f.first)
		if !ok && err == nil {
			stale = append(stale, b)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	sort.Strings(stale)
	return stale, nil
}
