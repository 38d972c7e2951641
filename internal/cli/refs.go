package cli

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

// Ids the way git and docker take them: a node or workload may be named by its whole
// id, its name, or a unique prefix of its id. An ambiguous reference is an error that
// lists the candidates.

// candidate is one thing a reference may mean.
type candidate struct {
	ID, Name, Extra string // Extra: the namespace of a workload
}

func (c candidate) String() string {
	s := c.ID
	if c.Name != "" {
		s += " (" + c.Name
		if c.Extra != "" {
			s += ", namespace " + c.Extra
		}
		s += ")"
	}
	return s
}

// matchRef picks what ref means among cands: an exact id wins, then an exact name,
// then an id prefix. Several matches at the first level that has any is ambiguity.
func matchRef(kind, ref string, cands []candidate) ([]candidate, error) {
	if ref == "" {
		return nil, usagef("empty %s id", kind)
	}
	levels := []func(candidate) bool{
		func(c candidate) bool { return c.ID == ref },
		func(c candidate) bool { return c.Name == ref },
		func(c candidate) bool { return strings.HasPrefix(c.ID, ref) },
	}
	for _, match := range levels {
		var out []candidate
		seen := map[candidate]bool{}
		for _, c := range cands {
			if match(c) && !seen[c] {
				seen[c] = true
				out = append(out, c)
			}
		}
		if len(out) > 0 {
			return out, nil
		}
	}
	return nil, nil
}

// ambiguous is the error for a reference that matches several things.
func ambiguous(kind, ref string, cands []candidate) error {
	sort.Slice(cands, func(i, j int) bool { return cands[i].ID < cands[j].ID })
	lines := make([]string, len(cands))
	for i, c := range cands {
		lines[i] = "  " + c.String()
	}
	return fmt.Errorf("%q matches %d %ss; use more of the id:\n%s", ref, len(cands), kind, strings.Join(lines, "\n"))
}

func nodeCandidates(nodes []protocol.NodePingResponse) []candidate {
	out := make([]candidate, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, candidate{ID: n.NodeID, Name: n.Tags[protocol.TagNode]})
	}
	return out
}

// resolveNode turns a node reference into a node id. A whole node id is used as is,
// without asking the fleet.
func (f *fleet) resolveNode(ctx context.Context, ref string) (string, error) {
	if nodeIDPattern.MatchString(ref) {
		return ref, nil
	}
	nodes, _, err := f.pingNodes(ctx, nil, f.gatherOpts(0))
	if err != nil {
		return "", err
	}
	m, err := matchRef("node", ref, nodeCandidates(nodes))
	switch {
	case err != nil:
		return "", err
	case len(m) == 0:
		return "", fmt.Errorf("node %s not found: no node has this id, name or id prefix (%d node(s) answered)", ref, len(nodes))
	case len(m) > 1:
		return "", ambiguous("node", ref, m)
	}
	return m[0].ID, nil
}

// workloadIDPattern is a whole workload id as nodes make them (a NUID).
var workloadIDPattern = regexp.MustCompile(`^[0-9A-Za-z]{22}$`)

func workloadCandidates(ws []protocol.WorkloadSummary, ns string) []candidate {
	out := make([]candidate, 0, len(ws))
	for _, w := range ws {
		c := candidate{ID: w.ID, Name: w.Name, Extra: ns}
		if w.Namespace != nil && *w.Namespace != "" {
			c.Extra = *w.Namespace
		}
		out = append(out, c)
	}
	return out
}

// resolveWorkload finds the workload ref means in the caller's namespace (every
// namespace from system) and the namespace it lives in. found is false when nothing
// matches: callers that can address a workload without knowing more use ref as is,
// since nodes that do not answer listings (or nexlets that omit it) may still run it.
func (f *fleet) resolveWorkload(ctx context.Context, ref string) (id, ns string, found bool, err error) {
	ws, _, err := f.listWorkloads(ctx, f.ns, nil)
	if err != nil {
		return "", "", false, err
	}
	return resolveAmong(ref, f.ns, workloadCandidates(ws, f.ns))
}

// resolveAmong is resolveWorkload's choice among cands (Extra: the namespace).
func resolveAmong(ref, callerNS string, cands []candidate) (id, ns string, found bool, err error) {
	m, err := matchRef("workload", ref, cands)
	switch {
	case err != nil:
		return "", "", false, err
	case len(m) == 0:
		return ref, callerNS, false, nil
	case len(m) > 1:
		if m[0].ID == ref {
			return "", "", false, fmt.Errorf("workload id %s matches workloads in %d namespaces; use --namespace to pick one", ref, len(m))
		}
		return "", "", false, ambiguous("workload", ref, m)
	}
	return m[0].ID, m[0].Extra, true, nil
}

// resolveWorkloadToStop is resolveWorkload for a stop: when nothing running matches,
// the nodes' memory of the workloads they stopped within the hour (in the caller's
// namespace) is asked too, so a repeated stop by name or id prefix finds the id the
// first stop stopped, and its node answers "already stopped at T". A reference that
// names several stopped workloads is ambiguous, as among running ones.
func (f *fleet) resolveWorkloadToStop(ctx context.Context, ref string) (id, ns, holder string, found bool, err error) {
	ws, stopped, holders, _, err := f.listWorkloadsAndStops(ctx, f.ns, nil, ref)
	if err != nil {
		return "", "", "", false, err
	}
	id, ns, found, err = resolveAmong(ref, f.ns, workloadCandidates(ws, f.ns))
	if found {
		holder = holders[id]
	}
	if err != nil || found || len(stopped) == 0 {
		return id, ns, holder, found, err
	}
	cands := make([]candidate, 0, len(stopped))
	for _, s := range stopped {
		c := candidate{ID: s.ID, Name: s.Name, Extra: f.ns}
		if f.ns == protocol.SystemNamespace && s.Namespace != "" {
			c.Extra = s.Namespace
		}
		cands = append(cands, c)
	}
	id, ns, found, err = resolveAmong(ref, f.ns, cands)
	if err != nil {
		return "", "", "", false, fmt.Errorf("no running workload matches, and among those stopped within the hour %w", err)
	}
	return id, ns, "", found, nil
}

// completionTimeout bounds the live lookups behind shell completion.
const completionTimeout = 1500 * time.Millisecond

// completeFleet offers live candidates for the first positional argument: ids with
// the name as description, and names.
func (a *app) completeFleet(list func(ctx context.Context, f *fleet) ([]candidate, error)) cobra.CompletionFunc {
	return func(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		if len(args) > 0 {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
		defer cancel()
		r := a.resolved()
		if r.NATS.Timeout > completionTimeout {
			r.NATS.Timeout = completionTimeout
		}
		f, done, err := a.connectFleet(ctx)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		defer done()
		cands, err := list(ctx, f)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		return completions(cands, toComplete), cobra.ShellCompDirectiveNoFileComp
	}
}

func completions(cands []candidate, prefix string) []cobra.Completion {
	var out []cobra.Completion
	seen := map[string]bool{}
	add := func(v, desc string) {
		if v != "" && strings.HasPrefix(v, prefix) && !seen[v] {
			seen[v] = true
			out = append(out, cobra.CompletionWithDesc(v, desc))
		}
	}
	for _, c := range cands {
		add(c.ID, c.Name)
	}
	for _, c := range cands {
		add(c.Name, c.ID)
	}
	return out
}

func (a *app) completeNodes() cobra.CompletionFunc {
	return a.completeFleet(func(ctx context.Context, f *fleet) ([]candidate, error) {
		nodes, _, err := f.pingNodes(ctx, nil, f.gatherOpts(0))
		return nodeCandidates(nodes), err
	})
}

func (a *app) completeWorkloads() cobra.CompletionFunc {
	return a.completeFleet(func(ctx context.Context, f *fleet) ([]candidate, error) {
		ws, _, err := f.listWorkloads(ctx, f.ns, nil)
		return workloadCandidates(ws, f.ns), err
	})
}

// completeNexlets offers the local node's nexlet names.
func (a *app) completeNexlets(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	c := a.client()
	defer c.Close()
	ns, err := c.Nexlets(ctx)
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []cobra.Completion
	for _, n := range ns {
		if strings.HasPrefix(n.Name, toComplete) {
			out = append(out, cobra.CompletionWithDesc(n.Name, n.Type+", "+string(n.State)))
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

// completeLocalWorkloads offers the ids (with names) of the local node's workloads.
func (a *app) completeLocalWorkloads(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	c := a.client()
	defer c.Close()
	ws, err := c.Workloads(ctx)
	if p := (*control.PartialList)(nil); err != nil && !errors.As(err, &p) {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []cobra.Completion
	for _, w := range ws {
		if strings.HasPrefix(w.ID, toComplete) {
			out = append(out, cobra.CompletionWithDesc(w.ID, w.Name))
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}
