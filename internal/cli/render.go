package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/olekukonko/tablewriter"
	"github.com/olekukonko/tablewriter/renderer"
	"github.com/olekukonko/tablewriter/tw"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

// table renders rows with a rounded border, headers as written (no upper-casing).
func table(w io.Writer, title string, header []string, rows [][]string) error {
	if title != "" {
		if _, err := fmt.Fprintln(w, title); err != nil {
			return err
		}
	}
	t := tablewriter.NewTable(w,
		tablewriter.WithRenderer(renderer.NewBlueprint(tw.Rendition{Symbols: tw.NewSymbols(tw.StyleRounded)})),
		tablewriter.WithHeaderAutoFormat(tw.Off),
		tablewriter.WithHeaderAlignment(tw.AlignLeft),
		tablewriter.WithRowAlignment(tw.AlignLeft),
		tablewriter.WithRowAutoWrap(tw.WrapNone),
		tablewriter.WithTrimSpace(tw.Off),
	)
	t.Header(header)
	for _, r := range rows {
		if err := t.Append(r); err != nil {
			return err
		}
	}
	return t.Render()
}

// kvTable renders label/value pairs.
func kvTable(w io.Writer, title string, pairs [][2]string) error {
	rows := make([][]string, len(pairs))
	for i, p := range pairs {
		rows[i] = []string{p[0], p[1]}
	}
	if title != "" {
		if _, err := fmt.Fprintln(w, title); err != nil {
			return err
		}
	}
	t := tablewriter.NewTable(w,
		tablewriter.WithRenderer(renderer.NewBlueprint(tw.Rendition{Symbols: tw.NewSymbols(tw.StyleRounded)})),
		tablewriter.WithRowAlignment(tw.AlignLeft),
		tablewriter.WithRowAutoWrap(tw.WrapNone),
	)
	for _, r := range rows {
		if err := t.Append(r); err != nil {
			return err
		}
	}
	return t.Render()
}

// friendlyDuration formats d like "1d 2h 3m 4s", as upstream's node list does.
func friendlyDuration(d time.Duration) string {
	d = d.Round(time.Second)
	if d <= 0 {
		return "0s"
	}
	days := d / (24 * time.Hour)
	d -= days * 24 * time.Hour
	h := d / time.Hour
	d -= h * time.Hour
	m := d / time.Minute
	d -= m * time.Minute
	s := d / time.Second
	var parts []string
	for _, p := range []struct {
		n    time.Duration
		unit string
	}{{days, "d"}, {h, "h"}, {m, "m"}, {s, "s"}} {
		if p.n > 0 {
			parts = append(parts, fmt.Sprintf("%d%s", p.n, p.unit))
		}
	}
	return strings.Join(parts, " ")
}

func orUnknown(s string) string {
	if s == "" {
		return "[unknown]"
	}
	return s
}

func sortedTags(tags map[string]string) []string {
	out := make([]string, 0, len(tags))
	for k, v := range tags {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// renderNodeList prints upstream's node list: sorted by nexus then name, a '*' after the
// id of a node in lame duck mode.
func renderNodeList(w io.Writer, nodes []protocol.NodePingResponse, now time.Time) error {
	if len(nodes) == 0 {
		_, err := fmt.Fprintln(w, "No nodes found")
		return err
	}
	nodes = append([]protocol.NodePingResponse(nil), nodes...)
	sort.SliceStable(nodes, func(i, j int) bool {
		a, b := nodes[i], nodes[j]
		if a.Tags[protocol.TagNexus] != b.Tags[protocol.TagNexus] {
			return a.Tags[protocol.TagNexus] < b.Tags[protocol.TagNexus]
		}
		if a.Tags[protocol.TagNode] != b.Tags[protocol.TagNode] {
			return a.Tags[protocol.TagNode] < b.Tags[protocol.TagNode]
		}
		return a.NodeID < b.NodeID
	})
	rows := make([][]string, 0, len(nodes))
	for _, n := range nodes {
		id := n.NodeID
		if n.Tags[protocol.TagLameduck] == "true" {
			id += "*"
		}
		rows = append(rows, []string{orUnknown(n.Tags[protocol.TagNexus]), id, orUnknown(n.Tags[protocol.TagNode]),
			n.Version, friendlyDuration(now.Sub(n.StartTime)), string(n.State), strconv.Itoa(n.AgentCount), orDash(userTags(n.Tags))})
	}
	return table(w, "Nex Nodes", []string{"Nexus", "ID (* = Lameduck Mode)", "Name", "Version", "Uptime", "State", "Running Agents", "Tags"}, rows)
}

// userTags are a node's own tags as k=v, sorted; the built-in nex.* ones are left out
// (their values have columns of their own or are in node info).
func userTags(tags map[string]string) string {
	var out []string
	for _, kv := range sortedTags(tags) {
		if !strings.HasPrefix(kv, "nex.") {
			out = append(out, kv)
		}
	}
	return strings.Join(out, ",")
}

// renderNodeInfo prints upstream's node info with its short or --full agent table.
func renderNodeInfo(w io.Writer, info protocol.NodeInfoResponse, full bool, now time.Time) error {
	// Nodes send Go's duration text ("26.646s"); shown as node list and status show
	// uptimes ("27s", "1h 2m 3s"). Anything else is shown as sent.
	uptime := info.Uptime
	if d, err := time.ParseDuration(uptime); err == nil {
		uptime = friendlyDuration(d)
	}
	kv := [][2]string{
		{"Nexus", info.Tags[protocol.TagNexus]},
		{"Node Name", info.Tags[protocol.TagNode]},
		{"Tags", strings.Join(sortedTags(info.Tags), ", ")},
		{"XKey", info.XKey},
		{"Uptime", uptime},
		{"Version", info.Version},
	}
	if info.AuctionsNotBid != nil { // a nexd node
		kv = append(kv, [2]string{"Not bid on", notBidText(info.AuctionsNotBid)})
	}
	if count := max(info.TombstoneCount, len(info.Tombstones)); count > 0 { // a nexd node
		kv = append(kv, [2]string{"Tombstones", tombstonesText(info.Tombstones, count, now)})
	}
	if d := info.LastDrain; d != nil {
		kv = append(kv, [2]string{"Last drain", lastDrainText(d, now)})
	}
	if err := kvTable(w, "Information about Node "+info.NodeID, kv); err != nil {
		return err
	}
	if err := renderTombstones(w, info.Tombstones, now); err != nil {
		return err
	}
	if more := info.TombstoneCount - len(info.Tombstones); more > 0 {
		if _, err := fmt.Fprintf(w, "(%d more not listed: nexctl status on the node lists every one)\n", more); err != nil {
			return err
		}
	}
	if len(info.NodeAgentSummaries) == 0 {
		_, err := fmt.Fprintln(w, "No agents running")
		return err
	}
	agents := append([]protocol.NodeAgentSummary(nil), info.NodeAgentSummaries...)
	sort.SliceStable(agents, func(i, j int) bool { return agents[i].AgentSummary.Name < agents[j].AgentSummary.Name })
	var rows [][]string
	var header []string
	if !full {
		header = []string{"", "Name", "Workload Type", "Running Workloads"}
		for _, a := range agents {
			rows = append(rows, []string{stoplight(a) + endsUnheardText(" ", a.EndsUnheard, now), fmt.Sprintf("%s [%s]", a.AgentSummary.Name, a.AgentSummary.Version),
				a.AgentSummary.Type, workloadCountText(a)})
		}
	} else {
		header = []string{"Health", "Id", "Name", "Workload Type", "Start Time", "State", "Supported Lifecycles", "Running Workloads", "Last Heartbeat"}
		for _, a := range agents {
			rows = append(rows, []string{fmt.Sprintf("%s [%s]", stoplight(a), a.AgentHealth) + endsUnheardText(", ", a.EndsUnheard, now), a.AgentID,
				fmt.Sprintf("%s [%s]", a.AgentSummary.Name, a.AgentSummary.Version), a.AgentSummary.Type,
				a.AgentSummary.StartTime.Format(time.RFC3339), a.AgentSummary.State, a.AgentSummary.SupportedLifecycles,
				workloadCountText(a), a.AgentLastHeartbeatTime.Format(time.RFC3339)})
		}
	}
	return table(w, "Running Agents", header, rows)
}

// workloadCountText is a nexlet's running workloads with its max_workloads when the
// node says it (nexd_max_workloads; absent: no bound, or a node that does not say):
// "3 (max 10)", "1 (max 1: full)", where a full nexlet gets no bid from its node.
func workloadCountText(a protocol.NodeAgentSummary) string {
	count := a.AgentSummary.WorkloadCount
	switch {
	case a.MaxWorkloads <= 0:
		return strconv.Itoa(count)
	case count >= a.MaxWorkloads:
		return fmt.Sprintf("%d (max %d: full)", count, a.MaxWorkloads)
	}
	return fmt.Sprintf("%d (max %d)", count, a.MaxWorkloads)
}

// endsUnheardText marks a nexlet whose workload ends its node does not hear (its list
// rounds are not whole), after sep: "ENDS UNHEARD for 2m (answers_extra)".
func endsUnheardText(sep string, u *protocol.EndsUnheard, now time.Time) string {
	if u == nil {
		return ""
	}
	return fmt.Sprintf("%sENDS UNHEARD for %s (%s)", sep, friendlyDuration(now.Sub(u.Since)), u.Checks)
}

// notBidText says how many auctions a node did not bid on since it started and why,
// the most frequent reason first: "12 auctions: 10 tags do not match, 2 draining".
func notBidText(byReason map[string]uint64) string {
	total := uint64(0)
	reasons := make([]string, 0, len(byReason))
	for r, n := range byReason {
		if n > 0 {
			total += n
			reasons = append(reasons, r)
		}
	}
	if total == 0 {
		return "no auction since start"
	}
	sort.Slice(reasons, func(i, j int) bool {
		a, b := byReason[reasons[i]], byReason[reasons[j]]
		return a > b || (a == b && reasons[i] < reasons[j])
	})
	parts := make([]string, len(reasons))
	for i, r := range reasons {
		parts[i] = fmt.Sprintf("%d %s", byReason[r], notBidReason(r))
	}
	return fmt.Sprintf("%d auction(s) since start: %s", total, strings.Join(parts, ", "))
}

// nexletDropsText words the nexlets' calls a node dropped or refused past its bounds
// (a row only when there are some: any is a nexlet gone wrong or rogue).
func nexletDropsText(d control.NexletDrops) string {
	var parts []string
	for _, c := range []struct {
		n    uint64
		what string
	}{
		{d.WorkloadRenewals, "workload renewal(s) past a nexlet's rate"},
		{d.UserRenewals, "renewal(s) of a nexlet's own user past its bound"},
		{d.Reregistrations, "registration(s) again past a nexlet's bound"},
		{d.ListAnswersRefused, "list answer(s) refused (the memory for lists taken)"},
	} {
		if c.n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", c.n, c.what))
		}
	}
	return strings.Join(parts, ", ") + " since start"
}

// lastDrainText words a node's last lame duck drain, kept until its next lame duck.
func lastDrainText(d *protocol.LastDrain, now time.Time) string {
	when := fmt.Sprintf("%s (%s ago)", d.At.Format(time.RFC3339), friendlyDuration(now.Sub(d.At)))
	if d.State == protocol.DrainDrained {
		return "drained at " + when
	}
	return fmt.Sprintf("%s at %s: %s", strings.ToUpper(d.State), when, d.Reason)
}

// notBidReason words a reason of nexd_auctions_not_bid_total.
func notBidReason(r string) string {
	switch r {
	case "draining":
		return "draining (lame duck)"
	case "tags":
		return "tags do not match"
	case "no_nexlet":
		return "no healthy nexlet of the type"
	case "lifecycle":
		return "lifecycle not supported by its nexlets"
	case "max_workloads":
		return "nexlets at max_workloads"
	case "credentials":
		return "workload credentials would not fit the control line (long nats.jsdomain)"
	case "state_store":
		return "state store cannot be written (JetStream, or the local state or runtime directory)"
	case "bad_request":
		return "bad request"
	case "namespace":
		return "invalid namespace"
	case "too_large":
		return "too large (body and headers over 64 KiB)"
	case "dropped":
		return "dropped unanswered (node could not keep up)"
	}
	return r
}

func stoplight(a protocol.NodeAgentSummary) string {
	if a.AgentHealthStoplight != "" {
		return a.AgentHealthStoplight
	}
	return protocol.Stoplight(a.AgentHealth)
}

// renderWorkloadList prints upstream's workload list; the Namespace column appears for
// the system namespace, Metadata and Tags with --show-metadata.
func renderWorkloadList(w io.Writer, ns string, ws []protocol.WorkloadSummary, showMeta bool) error {
	if len(ws) == 0 {
		_, err := fmt.Fprintln(w, "No workloads found")
		return err
	}
	showNS := ns == protocol.SystemNamespace
	ws = append([]protocol.WorkloadSummary(nil), ws...)
	sort.SliceStable(ws, func(i, j int) bool {
		a, b := deref(ws[i].Namespace), deref(ws[j].Namespace)
		if a != b {
			return a < b
		}
		if ws[i].Name != ws[j].Name {
			return ws[i].Name < ws[j].Name
		}
		return ws[i].ID < ws[j].ID
	})
	header := []string{"Id", "Name"}
	if showNS {
		header = append(header, "Namespace")
	}
	header = append(header, "Start Time", "Execution Time", "Type", "Lifecycle", "State")
	if showMeta {
		header = append(header, "Metadata", "Tags")
	}
	rows := make([][]string, 0, len(ws))
	for _, wl := range ws {
		rt := "--"
		if wl.WorkloadLifecycle == string(protocol.LifecycleFunction) {
			rt = wl.Runtime
		}
		row := []string{wl.ID, wl.Name}
		if showNS {
			nsv := "--"
			if wl.Namespace != nil {
				nsv = *wl.Namespace
			}
			row = append(row, nsv)
		}
		row = append(row, wl.StartTime, rt, wl.WorkloadType, wl.WorkloadLifecycle, string(wl.WorkloadState))
		if showMeta {
			meta := "--"
			if len(wl.Metadata) > 0 {
				b, _ := json.Marshal(wl.Metadata)
				meta = string(b)
			}
			row = append(row, meta, strings.Join(sortedTags(wl.Tags), ","))
		}
		rows = append(rows, row)
	}
	return table(w, "Running Workloads - "+ns, header, rows)
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for v := n / unit; v >= unit; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func orDash(s string) string {
	if s == "" {
		return "--"
	}
	return s
}

// renderStatus prints nexctl status.
func renderStatus(w io.Writer, st control.Status, now time.Time) error {
	nats := "disconnected"
	if st.NATS.Connected {
		nats = fmt.Sprintf("%s (rtt %s, %d reconnects)", st.NATS.Server, st.NATS.RTT.Std(), st.NATS.Reconnects)
	}
	if st.NATS.Embedded {
		nats += ", embedded"
	}
	cg := st.Cgroup.Mode
	switch {
	case cg == "":
		// A node still starting (waiting for NATS) has not set its cgroups up yet.
		cg = "not set up yet"
	case len(st.Cgroup.Enforced) > 0:
		cg += ", enforcing " + strings.Join(st.Cgroup.Enforced, ", ")
	default:
		cg += ", no limits enforced"
	}
	if st.Cgroup.Reason != "" {
		cg += " (" + st.Cgroup.Reason + ")"
	}
	if st.Cgroup.Driver == "systemd" {
		cg += "; workloads in systemd scopes (nex-<id>.scope in nex-workloads.slice)"
	}
	state := string(st.State)
	if st.Detail != "" {
		state += " (" + st.Detail + ")"
	}
	if st.LameduckUntil != nil {
		state += ", workloads stop at " + st.LameduckUntil.Format(time.RFC3339)
	}
	var counts []string
	total := 0
	for _, k := range sortedKeys(st.Workloads) {
		counts = append(counts, fmt.Sprintf("%d %s", st.Workloads[k], k))
		total += st.Workloads[k]
	}
	wl := strconv.Itoa(total)
	if len(counts) > 0 {
		wl += " (" + strings.Join(counts, ", ") + ")"
	}
	if st.WorkloadsAsOf != nil {
		wl += fmt.Sprintf(" (last known %s, NATS down)", st.WorkloadsAsOf.Format(time.RFC3339))
	}
	version := st.Version
	if st.Commit != "" {
		version += " [" + st.Commit + "]"
	}
	rows := [][2]string{
		{"Node ID", st.NodeID},
		{"Name", st.Name},
		{"Nexus", st.Nexus},
		{"Version", version},
		{"Uptime", friendlyDuration(st.Uptime.Std())},
		{"State", state},
		{"NATS", nats},
	}
	if js := st.NATS.JetStream; js != nil {
		text := fmt.Sprintf("%s, state bucket %s: %d of %d replicas current", js.State, js.Bucket, js.Current, js.Replicas)
		if js.Leader != "" {
			text += ", leader " + js.Leader
		}
		if js.State != "ok" {
			text = fmt.Sprintf("%s since %s (%s ago): %s", strings.ToUpper(js.State), js.Since.Format(time.RFC3339), friendlyDuration(now.Sub(js.Since)), js.Detail)
		}
		rows = append(rows, [2]string{"JetStream", text})
	}
	if ls := st.LocalState; ls != nil && ls.State != "ok" {
		rows = append(rows, [2]string{"Local state", fmt.Sprintf("%s since %s (%s ago): %s", strings.ToUpper(ls.State), ls.Since.Format(time.RFC3339), friendlyDuration(now.Sub(ls.Since)), ls.Detail)})
	}
	if l := st.NATS.Leaf; l != nil {
		text := fmt.Sprintf("%d of %d remotes connected", l.Connected, l.Remotes)
		if l.Connected < l.Remotes {
			text = "DOWN: " + text + " (cut off from the hub; local clients still served)"
		}
		rows = append(rows, [2]string{"Leaf", text})
	}
	rows = append(rows, [][2]string{
		{"Cgroups", cg},
		{"Workloads", wl},
	}...)
	if st.AuctionsNotBid != nil {
		rows = append(rows, [2]string{"Not bid on", notBidText(st.AuctionsNotBid)})
	}
	if d := st.NexletDrops; d != nil && *d != (control.NexletDrops{}) {
		rows = append(rows, [2]string{"Nexlet calls dropped", nexletDropsText(*d)})
	}
	if len(st.Tombstones) > 0 {
		rows = append(rows, [2]string{"Tombstones", tombstonesText(st.Tombstones, len(st.Tombstones), now)})
	} else if st.TombstoneCount > 0 {
		rows = append(rows, [2]string{"Tombstones", fmt.Sprintf("%d stopped workload(s) kept out of replays; removal from node state pending", st.TombstoneCount)})
	}
	if st.WorkloadUsers != "" {
		rows = append(rows, [2]string{"Workloads run as", st.WorkloadUsers})
	}
	if d := st.LastDrain; d != nil {
		rows = append(rows, [2]string{"Last drain", lastDrainText(d, now)})
	}
	if st.Public {
		rows = append(rows, [2]string{"View", "public: counts and health only (root and members of group nex see the rest)"})
	}
	if err := kvTable(w, "", rows); err != nil {
		return err
	}
	if err := renderTombstones(w, st.Tombstones, now); err != nil {
		return err
	}
	if len(st.Nexlets) == 0 {
		_, err := fmt.Fprintln(w, "No nexlets")
		return err
	}
	return renderNexlets(w, st.Nexlets, now)
}

// tombstonesText says how many of a node's stopped workloads wait for their removal
// from node state (count, of which ts lists some or all) and the oldest's age.
func tombstonesText(ts []control.Tombstone, count int, now time.Time) string {
	oldest := now
	for _, t := range ts {
		if t.Since.Before(oldest) {
			oldest = t.Since
		}
	}
	return fmt.Sprintf("%d stopped workload(s) kept out of replays; removal from node state pending (oldest %s ago, retried)", count, friendlyDuration(now.Sub(oldest)))
}

// renderTombstones lists the stopped workloads whose removal from node state is
// pending, oldest first; nothing when there are none.
func renderTombstones(w io.Writer, ts []control.Tombstone, now time.Time) error {
	if len(ts) == 0 {
		return nil
	}
	ts = append([]control.Tombstone(nil), ts...)
	sort.SliceStable(ts, func(i, j int) bool { return ts[i].Since.Before(ts[j].Since) })
	rows := make([][]string, 0, len(ts))
	for _, t := range ts {
		rows = append(rows, []string{t.ID, orDash(t.Namespace), t.Type, t.Since.Format(time.RFC3339), friendlyDuration(now.Sub(t.Since))})
	}
	return table(w, "Tombstones (stopped; removal from node state pending)", []string{"Id", "Namespace", "Type", "Since", "Age"}, rows)
}

func sortedKeys(m map[string]int) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// renderNexlets prints nexctl nexlets.
func renderNexlets(w io.Writer, ns []control.Nexlet, now time.Time) error {
	if len(ns) == 0 {
		_, err := fmt.Fprintln(w, "No nexlets")
		return err
	}
	rows := make([][]string, 0, len(ns))
	for _, n := range ns {
		hb := "--"
		if n.LastHeartbeat != nil && !n.LastHeartbeat.IsZero() {
			hb = friendlyDuration(now.Sub(*n.LastHeartbeat)) + " ago"
		}
		pid := "--"
		if n.PID > 0 {
			pid = strconv.Itoa(n.PID)
		}
		rows = append(rows, []string{n.Name, n.Type, pid, string(n.State), strconv.Itoa(n.Restarts),
			protocol.Stoplight(n.Health) + " " + orDash(n.Health) + endsUnheardText(", ", n.EndsUnheard, now), hb, orDash(n.LastExit), humanBytes(n.MemoryBytes), n.CPU.Std().Round(time.Millisecond).String()})
	}
	return table(w, "Nexlets", []string{"Name", "Type", "PID", "State", "Restarts", "Health", "Last Heartbeat", "Last Exit", "Memory", "CPU"}, rows)
}

// ended: a workload in this state no longer runs, so it has no uptime (its start time
// is when it began; before, a job that ran a second showed an uptime growing for ever).
func ended(state string) bool {
	return state == string(protocol.WorkloadStopped) || state == string(protocol.WorkloadError)
}

// renderLocalWorkloads prints nexctl workloads.
func renderLocalWorkloads(w io.Writer, ws []control.Workload, now time.Time) error {
	if len(ws) == 0 {
		_, err := fmt.Fprintln(w, "No workloads found")
		return err
	}
	ws = append([]control.Workload(nil), ws...)
	sort.SliceStable(ws, func(i, j int) bool {
		if ws[i].Namespace != ws[j].Namespace {
			return ws[i].Namespace < ws[j].Namespace
		}
		return ws[i].Name < ws[j].Name
	})
	rows := make([][]string, 0, len(ws))
	for _, wl := range ws {
		up := "--"
		if !wl.StartTime.IsZero() && !ended(wl.State) {
			up = friendlyDuration(now.Sub(wl.StartTime))
		}
		rows = append(rows, []string{wl.ID, wl.Name, wl.Namespace, wl.Type, wl.Lifecycle, wl.State, up,
			humanBytes(wl.MemoryBytes), wl.CPU.Std().Round(time.Millisecond).String()})
	}
	return table(w, "Workloads", []string{"Id", "Name", "Namespace", "Type", "Lifecycle", "State", "Uptime", "Memory", "CPU"}, rows)
}

// formatLogLine renders one node log line like a journal line.
func formatLogLine(l control.LogLine) string {
	var b strings.Builder
	b.WriteString(l.Time.Format(time.RFC3339Nano))
	b.WriteString(" ")
	b.WriteString(strings.ToUpper(orDash(l.Level)))
	if l.Nexlet != "" {
		b.WriteString(" [" + l.Nexlet + "]")
	}
	if l.WorkloadID != "" {
		b.WriteString(" [" + l.WorkloadID + "]")
	}
	b.WriteString(" ")
	b.WriteString(l.Msg)
	keys := make([]string, 0, len(l.Attrs))
	for k := range l.Attrs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%v", k, l.Attrs[k])
	}
	return b.String()
}
