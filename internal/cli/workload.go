package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/internal/logstream"
	"github.com/nexd-project/nexd/internal/scatter"
	"github.com/nexd-project/nexd/protocol"
)

// auctionStall ends an auction this long after the latest bid (or --gather-stall when
// longer) unless every expected bid is in.
const auctionStall = 250 * time.Millisecond

// lostBidWait bounds how long nexctl keeps asking for a bid it believes was lost.
const lostBidWait = 20 * time.Second

func (a *app) workloadCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "workload",
		Aliases: []string{"workloads"},
		Short:   "Run, stop, list, inspect, clone and tail workloads across the fleet",
		Args:    cobra.ArbitraryArgs,
		RunE:    groupRun,
	}
	cmd.AddCommand(a.workloadRunCmd(), a.workloadStopCmd(), a.workloadListCmd(), a.workloadInfoCmd(),
		a.workloadCloneCmd(), a.workloadLogsCmd())
	return cmd
}

// placement is a started workload.
type placement struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Node string `json:"node"`
}

func bidLabel(b protocol.AuctionResponse) string {
	switch {
	case b.NodeName != "" && b.NodeID != "":
		return fmt.Sprintf("%s (%s)", b.NodeName, b.NodeID)
	case b.NodeID != "":
		return b.NodeID
	}
	return "bidder " + b.BidderID
}

// place auctions spec in ns and deploys it to the least-loaded bidder, falling back to
// the next bid when a deploy definitely failed.
func (a *app) place(ctx context.Context, f *fleet, ns string, spec runSpec, expectBids int) (placement, error) {
	if err := protocol.CheckNamespace(ns); err != nil { // no node would bid
		return placement{}, usageError{err}
	}
	var nodes []protocol.NodePingResponse
	if expectBids <= 0 {
		// A quick ping tells how many bids can come, so the auction can end as soon as
		// all are in; nodes in other accounts or without ping permission just mean we
		// wait for the stall.
		var err error
		o := f.gatherOpts(0)
		o.some = true // a count to end the auction early by: without it, it ends on its stall
		var bad []error
		if nodes, bad, err = f.pingNodes(ctx, nil, o); err == nil {
			// Answers refused (a forged row: answers.go) count too: whoever sent them
			// likely bids as well, and the auction must not end before the nodes' bids.
			expectBids = len(nodes) + len(bad)
		}
	}
	opts := gatherOpts{first: f.first, stall: max(auctionStall, f.stall), max: expectBids}
	bids, signed, auctionID, bad, err := f.auction(ctx, ns, spec.Type, spec.Tags, opts)
	// Nodes answered the ping but nobody bid: a node shedding an auction flood drops
	// auctions it cannot keep up with, so ask again, twice; then on, with backoff for
	// up to lostBidWait more, while a node says it has a healthy nexlet of the type and
	// lifecycle with room. A nexd node says when its nexlets are at max_workloads, and
	// that is the error; an upstream node does not, and withholds its bid all the same:
	// hence a bound well below the deploy timeout.
	deadline, wait, asked := time.Now().Add(min(f.deployTimeout, lostBidWait)), 300*time.Millisecond, false
	var full []string // healthy nexlets of the type a node says are at max_workloads
	for retry := 0; err == nil && len(bids) == 0 && expectBids > 0; retry++ {
		if retry == 0 {
			// Full nexlets are known at once: no retry would get their bids.
			if holder, fullNow, _ := f.healthyHolder(ctx, nodes, spec.Type, spec.Lifecycle, spec.Tags); holder == "" && len(fullNow) > 0 {
				full = fullNow
				break
			}
		}
		if retry >= 2 {
			if !asked {
				asked = true
				holder, fullNow, unasked := f.healthyHolder(ctx, nodes, spec.Type, spec.Lifecycle, spec.Tags)
				switch {
				case unasked != nil:
					// Nothing to tell a lost bid from none (a tenant may not ask the
					// system namespace's INFO): ask again, as for a lost one.
					a.warnf("no bid yet, and no node could be asked about its nexlets (%v): asking again until %s",
						unasked, deadline.Format(time.TimeOnly))
				case holder == "":
					full = fullNow
				default:
					a.warnf("no bid yet, though node %s has a healthy %s nexlet (a node under an auction flood drops auctions): asking again until %s",
						holder, spec.Type, deadline.Format(time.TimeOnly))
				}
				if unasked == nil && holder == "" {
					break
				}
			}
			if time.Now().Add(wait).After(deadline) {
				break
			}
		}
		select {
		case <-ctx.Done():
			return placement{}, ctx.Err()
		case <-time.After(wait):
		}
		if retry >= 2 {
			wait = min(2*wait, 5*time.Second)
		}
		var more []error
		bids, signed, auctionID, more, err = f.auction(ctx, ns, spec.Type, spec.Tags, opts)
		bad = append(bad, more...)
	}
	if err != nil {
		return placement{}, err
	}
	a.warnAll(bad)
	if len(bids) == 0 && len(full) > 0 {
		return placement{}, fmt.Errorf("no bids for a %s workload in namespace %s: %s (stop a workload there, or raise its max_workloads)",
			spec.Type, ns, strings.Join(full, "; "))
	}
	if len(bids) == 0 {
		tags, bad, err := f.placementTags(ctx)
		a.warnAll(bad)
		if err != nil {
			return placement{}, fmt.Errorf("no bids for a %s workload, and asking nodes for their tags failed: %w", spec.Type, err)
		}
		return placement{}, fmt.Errorf("no bids for a %s workload in namespace %s: %s", spec.Type, ns, diagnoseNoBids(tags, spec.Type, spec.Tags))
	}
	usable, skipped := orderBids(bids, spec.Lifecycle)
	if len(usable) == 0 {
		return placement{}, fmt.Errorf("%d node(s) bid, but none supports the %s lifecycle", skipped, spec.Lifecycle)
	}
	// Signed bids first; an environment is sealed only to a signed bid's xkey.
	sort.SliceStable(usable, func(i, j int) bool { return signed[usable[i].BidderID] && !signed[usable[j].BidderID] })
	if seals := (len(spec.Env) > 0 && !spec.PlainEnv) || spec.CloneOf != ""; seals && !a.allowUnsigned {
		unsigned := 0
		for len(usable) > 0 && !signed[usable[len(usable)-1].BidderID] {
			usable, unsigned = usable[:len(usable)-1], unsigned+1
		}
		if len(usable) == 0 {
			return placement{}, fmt.Errorf("%d node(s) bid without a signature (upstream nex nodes do not sign; anyone on the bus can pose as a node), "+
				"so the environment is not sealed to any of them: deploy to a nexd node, or pass --allow-unsigned-bids if you trust every client on this bus", unsigned)
		}
	}
	var errs []error
	for i, bid := range usable {
		bs := spec
		var err error
		if spec.CloneOf != "" {
			bs, err = a.resealedClone(ctx, f, spec, bid, ns, auctionID)
		}
		var rr string
		if err == nil {
			rr, err = bs.runRequestFor(bid)
		}
		if err == nil && !signed[bid.BidderID] {
			a.warnf("note: %s did not sign its bid (an upstream node?); its identity is not verified", bidLabel(bid))
		}
		if err == nil {
			req := protocol.StartWorkloadRequest{
				Description: spec.Description, Name: spec.Name, Namespace: ns, RunRequest: rr,
				Tags: spec.Tags, WorkloadLifecycle: spec.Lifecycle, WorkloadType: spec.Type,
			}
			var resp protocol.StartWorkloadResponse
			signer := ""
			if signed[bid.BidderID] {
				signer = bid.NodeID
			}
			resp, err = f.deploy(ctx, bid.BidderID, req, signer)
			if err == nil {
				return placement{ID: resp.ID, Name: resp.Name, Node: bid.NodeID}, nil
			}
			if errors.Is(err, errOutcomeUnknown) || errors.Is(err, errLinkClosed) {
				return placement{}, exitError{ExitUnknown, fmt.Errorf("deploy to %s: %w", bidLabel(bid), err)}
			}
			if !errors.Is(err, errNotStarted) {
				// The node may still be starting it: trying another could run two copies.
				return placement{}, fmt.Errorf("deploy to %s: %w; the workload may still be starting there, check 'nexctl workload list' before retrying", bidLabel(bid), err)
			}
		}
		errs = append(errs, fmt.Errorf("%s: %w", bidLabel(bid), err))
		if i < len(usable)-1 {
			a.warnf("deploy to %s failed: %v; trying the next bid", bidLabel(bid), err)
		}
	}
	return placement{}, fmt.Errorf("every bid failed:\n  %s", strings.ReplaceAll(errors.Join(errs...).Error(), "\n", "\n  "))
}

// resealedClone asks the node running the workload spec copies for its start request
// with the sealed environment re-sealed for bid's nexlet (the node checks the bid's
// signature), and returns the spec with that environment.
func (a *app) resealedClone(ctx context.Context, f *fleet, spec runSpec, bid protocol.AuctionResponse, ns, auctionID string) (runSpec, error) {
	swr, err := f.cloneFor(ctx, spec.CloneOf, bid, ns, auctionID)
	if err != nil {
		return spec, fmt.Errorf("re-seal the environment of %s for this bid: %w", spec.CloneOf, err)
	}
	out, _, err := cloneSpec(swr, spec.Tags, func(protocol.EncEnv) (map[string]string, error) { return nil, errors.New("sealed") })
	if err != nil {
		return spec, fmt.Errorf("re-seal the environment of %s for this bid: %w", spec.CloneOf, err)
	}
	out.CloneOf = ""
	return out, nil
}

func (a *app) workloadRunCmd() *cobra.Command {
	var (
		file, startJSON, name, desc, typ, lifecycle string
		plainEnv                                    bool
		bids                                        int
		runAs                                       string
	)
	tags := newKV("tags")
	env := &envFlag{}
	cmd := &cobra.Command{
		Use:     "run [flags] [-- COMMAND [ARG...]]",
		Aliases: []string{"start", "deploy"},
		Short:   "Start a workload on the least-loaded node that bids for it",
		Long: `Start a workload. The start request comes from a Nexfile (-f, JSON or YAML with keys
name, description, tags, type, lifecycle, start_request; ./Nexfile is used when present and
nothing else is given), from --start-request JSON, or for native workloads from a command
after '--'. Flags override the file.

--env values are sealed for the winning nexlet's xkey (encrypted_environment) so only that
nexlet can read them; --plain-env sends them in clear text in the environment instead.

The auction ends once every pinged node has bid (or --bids N are in), else 250ms after the
latest bid. The least-loaded bidder is tried first; on a failed deploy the next bid is
tried. With no bids, nexctl says which requested tags no node offers, or that no node has a
healthy nexlet of the type.

  nexctl workload run --name web -- /usr/bin/python3 -m http.server 8080
  nexctl workload run -f Nexfile.yaml --tags region=lab --env TOKEN=abc`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 && cmd.ArgsLenAtDash() != 0 {
				return usagef("put the command after '--': nexctl workload run --name NAME -- %s", strings.Join(args, " "))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			fl := cmd.Flags()
			in := runInputs{Command: args, Flags: runFlags{Name: name, Description: desc, Type: typ, Lifecycle: lifecycle,
				StartJSON: startJSON, Tags: tags.m, Env: env.m, PlainEnv: plainEnv, Bids: bids, Changed: map[string]bool{}}}
			fl.Visit(func(f *pflag.Flag) { in.Flags.Changed[f.Name] = true })
			exists := func(p string) bool { fi, err := os.Stat(p); return err == nil && !fi.IsDir() }
			if in.FileName = pickNexfile(file, fl.Changed("start-request"), len(args), exists); in.FileName != "" {
				data, err := os.ReadFile(in.FileName)
				if err != nil {
					return usagef("Nexfile: %v", err)
				}
				nf, err := parseNexfile(in.FileName, data)
				if err != nil {
					return usageError{err}
				}
				in.File = &nf
			}
			if len(args) > 0 {
				sr, err := shortFormStart(args)
				if err != nil {
					return usageError{err}
				}
				in.CommandStart = sr
			}
			spec, err := mergeRunSpec(in)
			if err != nil {
				return err
			}
			if fl.Changed("user") {
				spec.Start["user"] = runAs
			}

			// Before anything is sent: a node refuses the deploy anyway, and says less.
			if err := protocol.CheckNamespace(a.resolved().Namespace); err != nil {
				return usagef("%s: %w", a.res.Origins["namespace"], err)
			}
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			p, err := a.place(cmd.Context(), f, a.namespace, spec, bids)
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(p)
			}
			fmt.Fprintf(a.out(), "Workload %s [%s] successfully started\n", p.Name, p.ID)
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVarP(&file, "nexfile", "f", "", "Nexfile describing the workload (JSON or YAML)")
	fs.StringVar(&startJSON, "start-request", "", "the nexlet's start request as JSON")
	fs.StringVar(&name, "name", "", "workload name")
	fs.StringVar(&desc, "description", "", "workload description")
	fs.StringVar(&typ, "type", "native", "workload type (the nexlet type)")
	fs.StringVar(&lifecycle, "lifecycle", string(protocol.LifecycleService), "service, job or function")
	fs.Var(tags, "tags", "only nodes with this tag (repeatable)")
	fs.Var(env, "env", "environment variable KEY=VALUE (repeatable; sealed for the nexlet)")
	fs.BoolVar(&plainEnv, "plain-env", false, "send --env in clear text instead of sealed")
	fs.IntVar(&bids, "bids", 0, "end the auction once this many bids are in (default: the number of nodes)")
	fs.StringVar(&runAs, "user", "", "run as this named user, if the node allows it (workload_users); default: a dynamic uid")
	return cmd
}

func (a *app) workloadStopCmd() *cobra.Command {
	var noWait bool
	cmd := &cobra.Command{
		Use:     "stop WORKLOAD",
		Aliases: []string{"undeploy"},
		Short:   "Stop a workload (in the system namespace, its namespace is looked up first)",
		Long: `Stop a workload. nexctl waits until the workload is gone: it exited on SIGTERM, or was
killed at the end of its stop grace, and says which. A workload that is still stopping is
reported as stopping, never as not found. A workload stopped within the last hour is
reported as "already stopped at T (how)", exit 0. With --no-wait nexctl returns as soon
as the node holding the workload says it is stopping it: for a nexlet that records its
stops (the native nexlet), once the nexlet recorded the stop, so a crash of nexd or of
the nexlet from then on does not undo it; exit 1 when the nexlet did not confirm that
within 2s (the stop was sent and may still complete). WORKLOAD is an id, a name or a unique
id prefix; when no running workload matches, the nodes' memory of the workloads stopped
within the hour in this namespace is searched the same way. Exit 1 when nothing was
stopped (not found, or the node could not stop it); exit 3 when the node holding it
answered with an error of its own (5xx): the stop may have gone on there.`,
		Args:              exactArgs(1, "WORKLOAD"),
		ValidArgsFunction: a.completeWorkloads(),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			id, ns, holder, found, err := f.resolveWorkloadToStop(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			// From system, a whole workload id the listing missed (a node's list answer
			// that came late under load, or a nexlet that did not answer its node in
			// time) is still asked for: the node holding it answers the stop, which a
			// stopping workload must get, never "not found" (TestStopIDTheListMissed).
			guessed := !found && f.ns == protocol.SystemNamespace
			if guessed && !workloadIDPattern.MatchString(args[0]) {
				return f.notFound(args[0], "no id, name or id prefix matches")
			}
			r, stopping, err := f.stopWorkload(cmd.Context(), ns, id, !noWait, holder)
			if errors.Is(err, errLinkClosed) {
				return exitError{ExitUnknown, fmt.Errorf("stop workload %s: %w", id, err)}
			}
			var unrecorded stopUnrecorded
			if stopping && noWait && errors.As(err, &unrecorded) {
				// Sent, and maybe under way, but not known to survive a crash.
				return exitError{ExitFailed, fmt.Errorf("workload %s: the node is stopping it, but the stop is not confirmed recorded: %s; a restart of nexd or of that nexlet now may leave it running or start it again (check 'nexctl workload list', or stop it again)", id, unrecorded)}
			}
			if sf := (*stopFailed)(nil); errors.As(err, &sf) && !r.Stopped {
				if sf.unknown() {
					return exitError{ExitUnknown, fmt.Errorf("stop workload %s: %w; whether it stopped is unknown: 'nexctl workload list' shows it if it runs", id, err)}
				}
				return fmt.Errorf("stop workload %s: %w", id, err)
			}
			if guessed && err == nil && !r.Stopped && !stopping && r.Message == protocol.ErrTextWorkloadNotFound {
				// Every node was asked to stop it, those whose list failed too.
				return fmt.Errorf("workload %s not found in namespace %s (no id, name or id prefix matches, and no node holds it)", args[0], f.ns)
			}
			if err != nil && !r.Stopped && !stopping {
				return fmt.Errorf("stop workload %s: %w", id, err)
			}
			if a.json {
				if err := a.printJSON(r); err != nil {
					return err
				}
			} else if r.Stopped && r.AlreadyStoppedAt != "" {
				// A repeat: stopped before, which is what was asked (exit 0).
				fmt.Fprintf(a.out(), "Workload %s %s\n", id, r.Message)
			} else if r.Stopped {
				how := ""
				if r.Message != "" && r.Message != "stopped" {
					how = " (" + r.Message + ")"
				}
				fmt.Fprintf(a.out(), "Workload %s successfully stopped%s\n", id, how)
			} else if stopping && noWait {
				fmt.Fprintf(a.out(), "Workload %s is stopping\n", id)
				return nil
			}
			if !r.Stopped {
				return exitError{ExitFailed, fmt.Errorf("workload %s was not stopped: %s", id, orDash(r.Message))}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the node says it is stopping the workload (its nexlet recorded the stop)")
	return cmd
}

func (a *app) workloadListCmd() *cobra.Command {
	var filter []string
	var showMeta bool
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List workloads in the namespace (every namespace from system)",
		Long: `List workloads in the namespace (every namespace from system). A node whose nexlet did not
answer it in time (busy, restarting) or answered with an error says so: nexctl prints the
rows that came, warns on stderr naming the node and the nexlet, and exits 1. A node that
answered the list itself with an error (its list over the NATS server's max_payload, or
its nexlets could not be asked) is named with its error, after the rows that came, and
nexctl exits 1: its workloads are unknown, not absent.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			ws, bad, err := f.listWorkloads(cmd.Context(), a.namespace, filter)
			if err != nil {
				return err
			}
			var partial, failed []error
			for _, e := range bad {
				p, lf := (*partialList)(nil), (*listFailed)(nil)
				switch {
				case errors.As(e, &p):
					a.warnf("%v", p)
					partial = append(partial, p)
				case errors.As(e, &lf):
					failed = append(failed, lf)
				default:
					a.warnAll([]error{e})
				}
			}
			switch {
			case a.json:
				if ws == nil {
					ws = []protocol.WorkloadSummary{}
				}
				err = a.printJSON(ws)
			case len(ws) == 0 && len(failed) > 0:
				// Not "No workloads found": a node that failed to answer may run some.
			default:
				err = renderWorkloadList(a.out(), a.namespace, ws, showMeta)
			}
			if err != nil {
				return err
			}
			// The rows above are all that came; a script must not take them for all.
			var why []string
			switch {
			case len(failed) == 1:
				why = append(why, fmt.Sprintf("%v; its workloads are not among the rows shown", failed[0]))
			case len(failed) > 1:
				why = append(why, fmt.Sprintf("%d nodes did not list their workloads, which are not among the rows shown:\n  %s",
					len(failed), strings.ReplaceAll(errors.Join(failed...).Error(), "\n", "\n  ")))
			}
			if len(partial) > 0 {
				why = append(why, fmt.Sprintf("the list is partial: %d node(s) could not list every nexlet's workloads (see the warnings)", len(partial)))
			}
			if len(why) > 0 {
				return exitError{ExitFailed, errors.New(strings.Join(why, "; and "))}
			}
			return nil
		},
	}
	cmd.Flags().StringSliceVar(&filter, "filter", nil, "only workloads with this id or name (repeatable)")
	cmd.Flags().BoolVar(&showMeta, "show-metadata", false, "add metadata and tags columns")
	return cmd
}

// redactRunRequest parses a run_request and hides a sealed environment's ciphertext.
func redactRunRequest(rr string) any {
	var m map[string]any
	if json.Unmarshal([]byte(rr), &m) != nil {
		return rr
	}
	if _, ok := m["encrypted_environment"]; ok {
		m["encrypted_environment"] = "(sealed)"
	}
	return m
}

func (a *app) workloadInfoCmd() *cobra.Command {
	return &cobra.Command{
		Use:               "info WORKLOAD",
		Short:             "Show one workload: its summary and start request",
		Args:              exactArgs(1, "WORKLOAD"),
		ValidArgsFunction: a.completeWorkloads(),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			id, _, _, err := f.resolveWorkload(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			sum, err := f.workloadNamespace(cmd.Context(), id)
			if err != nil {
				return err
			}
			// No re-seal asked: the environment is shown "(sealed)" whatever key it is
			// sealed to, so naming one only made nexd nodes log a refusal and upstream
			// nodes re-seal the workload's secrets to a key nexctl then threw away.
			var start any
			var desc string
			swr, cerr := f.cloneRequest(cmd.Context(), id, "")
			if cerr == nil {
				start, desc = redactRunRequest(swr.RunRequest), swr.Description
			} else {
				a.warnf("start request unavailable: %v", cerr)
			}
			if a.json {
				return a.printJSON(map[string]any{"summary": sum, "description": desc, "start_request": start})
			}
			meta := make([]string, 0, len(sum.Metadata))
			for _, k := range sortedStringKeys(sum.Metadata) {
				meta = append(meta, k+"="+sum.Metadata[k])
			}
			pairs := [][2]string{
				{"ID", sum.ID}, {"Name", sum.Name}, {"Namespace", deref(sum.Namespace)},
				{"Type", sum.WorkloadType}, {"Lifecycle", sum.WorkloadLifecycle}, {"State", string(sum.WorkloadState)},
				{"Start Time", sum.StartTime}, {"Tags", strings.Join(sortedTags(sum.Tags), ", ")},
				{"Metadata", strings.Join(meta, ", ")}, {"Description", desc},
			}
			if err := kvTable(a.out(), "Workload "+id, pairs); err != nil {
				return err
			}
			if start != nil {
				b, _ := json.MarshalIndent(start, "", "  ")
				fmt.Fprintf(a.out(), "Start request:\n%s\n", b)
			}
			return nil
		},
	}
}

func sortedStringKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// cloneWorkload starts a copy of workload id through a new auction (tags, when set,
// replace its tags) and, with stop, stops the original once the copy runs. err means
// no copy started; stopErr that the copy runs but the original was not stopped.
func (a *app) cloneWorkload(ctx context.Context, f *fleet, id string, tags map[string]string, stop bool) (p placement, stopped bool, stopErr, err error) {
	swr, holder, err := f.cloneRequestHeld(ctx, id)
	if err != nil {
		return p, false, nil, err
	}
	// A sealed environment never reaches this client: the node running the workload
	// re-seals it for the nexlet of each signed bid (place, resealedClone).
	spec, _, err := cloneSpec(swr, tags, func(protocol.EncEnv) (map[string]string, error) { return nil, errors.New("sealed") })
	if err != nil {
		return p, false, nil, fmt.Errorf("cannot clone workload %s: %w", id, err)
	}
	if _, sealed := spec.Start["encrypted_environment"]; sealed {
		spec.CloneOf = id
	}
	if p, err = a.place(ctx, f, swr.Namespace, spec, 0); err != nil {
		return p, false, nil, err
	}
	if stop {
		// Its holder's answer, not the first "not found" of the others (the copy's
		// node among them): a holder loaded enough to answer after them stopped it.
		r, _, err := f.stopWorkload(ctx, swr.Namespace, id, true, holder)
		switch {
		case err != nil:
			stopErr = fmt.Errorf("clone %s started, but stopping the original %s failed: %w", p.ID, id, err)
		case !r.Stopped:
			stopErr = fmt.Errorf("clone %s started, but the original %s was not stopped: %s", p.ID, id, orDash(r.Message))
		default:
			stopped = true
		}
	}
	return p, stopped, stopErr, nil
}

func (a *app) workloadCloneCmd() *cobra.Command {
	var stop bool
	tags := newKV("tags")
	cmd := &cobra.Command{
		Use:     "clone WORKLOAD",
		Aliases: []string{"cp", "copy"},
		Short:   "Start a copy of a workload on a node chosen by a new auction",
		Long: `Start a copy of a workload: its start request is fetched from the node that runs it,
then auctioned again in the workload's namespace with --tags (which replace its tags).
A sealed environment never reaches this client: the node running the workload re-seals
it for the new nexlet, and only for a bid its node signed.`,
		Args:              exactArgs(1, "WORKLOAD"),
		ValidArgsFunction: a.completeWorkloads(),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			id, _, _, err := f.resolveWorkload(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			p, stopped, stopErr, err := a.cloneWorkload(cmd.Context(), f, id, tags.m, stop)
			if err != nil {
				return err
			}
			if a.json {
				if err := a.printJSON(map[string]any{"id": p.ID, "name": p.Name, "node": p.Node, "original_stopped": stopped}); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(a.out(), "Workload %s [%s] successfully started\n", p.Name, p.ID)
				if stopped {
					fmt.Fprintf(a.out(), "Original workload [%s] stopped\n", id)
				}
			}
			if stopErr != nil {
				return exitError{ExitFailed, stopErr}
			}
			return nil
		},
	}
	cmd.Flags().Var(tags, "tags", "placement tags for the copy (repeatable; replace the original's)")
	cmd.Flags().BoolVar(&stop, "stop", false, "stop the original once the copy runs")
	return cmd
}

func (a *app) workloadLogsCmd() *cobra.Command {
	var follow bool
	var wait time.Duration
	var sinceArg string
	var tail int
	cmd := &cobra.Command{
		Use:   "logs WORKLOAD",
		Short: "Print a workload's output: past lines (--since, --tail) and live ones (-f)",
		Long: `Print a workload's stdout and stderr. --since 10m (or an RFC 3339 time) and --tail N show
past output: from this host's journal or the local node's log buffer when the workload ran
here, else from the log stream NEX_LOGS that nodes keep with log_stream = true (bounded by
log_stream_max_age and log_stream_max_bytes). Without them only live lines from the feeds
($NEX.FEED.<namespace>.logs.<id>.stdout|stderr) are shown: those published within --wait,
or with -f until interrupted.`,
		Args:              exactArgs(1, "WORKLOAD"),
		ValidArgsFunction: a.completeWorkloads(),
		RunE: func(cmd *cobra.Command, args []string) error {
			if tail < 0 {
				return usagef("--tail must not be negative")
			}
			since, err := parseSince(sinceArg, time.Now())
			if err != nil {
				return usageError{err}
			}
			history := sinceArg != "" || cmd.Flags().Changed("tail")
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			id, ns, found, err := f.resolveWorkload(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if !found && f.ns == protocol.SystemNamespace {
				if !history {
					return f.notFound(args[0], "no id, name or id prefix matches")
				}
				ns = "*" // a finished workload: its history may still be kept
			}
			before := f.nc.LastError()
			sub, err := scatter.Stream(f.nc, protocol.LogsWildcard(ns, id))
			if err != nil {
				return fmt.Errorf("subscribe to logs of %s: %w", id, err)
			}
			defer sub.Close()
			// The wait starts once the server has the subscription, not before.
			if err := f.nc.Flush(); err != nil {
				return fmt.Errorf("subscribe to logs of %s: %w", id, err)
			}
			if err := scatter.Refused(f.nc, before, protocol.LogsWildcard(ns, id)); err != nil {
				return err
			}
			if history {
				lines, from, err := a.workloadHistory(cmd.Context(), f, ns, id, since, tail)
				if err != nil {
					return err
				}
				if len(lines) == 0 {
					a.warnf("no lines of workload %s in %s", id, from)
				}
				for _, l := range lines {
					if err := a.printLogLine(l); err != nil {
						return err
					}
				}
				if !follow {
					return nil
				}
			}
			ctx := cmd.Context()
			if !follow {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, wait)
				defer cancel()
			}
			n, err := a.readStream(ctx, sub, "log lines", func(m *nats.Msg) error {
				return a.printLogLine(logstream.Line{Time: time.Now().UTC(), Stream: protocol.LastToken(m.Subject), Line: string(m.Data)})
			})
			if err != nil {
				return err
			}
			if !follow && n == 0 {
				a.warnf("no log lines arrived within %s; use --tail or --since for past output, -f to follow", wait)
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new lines until interrupted")
	cmd.Flags().DurationVar(&wait, "wait", 2*time.Second, "without -f, --since or --tail, how long to collect live lines")
	cmd.Flags().StringVar(&sinceArg, "since", "", "past lines since this long ago (10m) or this RFC 3339 time")
	cmd.Flags().IntVarP(&tail, "tail", "n", 0, "the last N past lines")
	return cmd
}
