package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

// drainPoll is how often a drain is looked at.
const drainPoll = 500 * time.Millisecond

// killedPrefix starts the stop reason of a workload that outlived its stop grace.
const killedPrefix = "killed after"

// isTTY reports whether w (under its sanitizer) is a terminal (progress bars redraw in
// place there).
func isTTY(w io.Writer) bool {
	f, ok := terminal(w).(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// drainNode is one node's drain as --wait shows it.
type drainNode struct {
	ID, Name string
	Until    time.Time
	Start    int // workloads when the drain began (-1: unknown yet)
	Left     int
	Killed   int
	Gone     bool // the node stopped answering: it shut down
	Done     bool
	// Partial, when set, says which nexlets' workloads the node's last list lacked: a
	// node is never counted drained on such a list (their workloads may run on).
	Partial string
	// Told: the node (nexd) promised to tell its drain's outcome, and Outcome and
	// Reason are what it told (protocol.DrainDrained or DrainFailed; "" if it stopped
	// without a word). Such a node is done when it tells, not when its counts reach 0.
	Told            bool
	Outcome, Reason string
	// goneAt is when the node was first seen gone: a told node's outcome may still be
	// on its way for a moment.
	goneAt time.Time
	tell   *drainTell
	// killed are the workloads whose kill was counted: a stop event is not signed,
	// and anyone who reads the feeds and publishes on them can send one again (each
	// copy counted before: 4 killed on a node of 2 workloads).
	killed map[string]bool
}

// drained is the outcome --wait reports: the node's own word when it gave one, else
// done and not on a partial list (a node that does not tell: upstream).
func (d *drainNode) drained() bool {
	if d.Told {
		return d.Done && d.Outcome == protocol.DrainDrained
	}
	return d.Done && d.Partial == ""
}

// unknown says the node promised its outcome and stopped without telling it.
func (d *drainNode) unknown() bool { return d.Done && d.Told && d.Outcome == "" }

// tellWait is how long after a node that promised its drain's outcome was seen gone
// --wait still waits for it: the node sends it before it stops, and again until this
// client acknowledged it or protocol.DrainTellFor passed, so a node whose NATS link
// (or this client's) was down as its drain ended tells it once the link is back.
// Before, 2 s: such an outcome was lost and reported not known.
const tellWait = protocol.DrainTellFor + 2*time.Second

// drainView prints a drain: a bar per node redrawn in place on a terminal, a plain line
// per change otherwise.
type drainView struct {
	w     io.Writer
	tty   bool
	cols  int               // terminal width (0: unknown); redrawn lines must not wrap
	drawn int               // lines drawn last time (tty)
	last  map[string]string // last plain line per node
}

func newDrainView(w io.Writer, tty bool) *drainView {
	v := &drainView{w: w, tty: tty, last: map[string]string{}}
	if tty {
		v.cols = termWidth(w)
	}
	return v
}

// termWidth is the terminal's width in columns, 0 when w is none or it is unknown.
func termWidth(w io.Writer) int {
	f, ok := terminal(w).(*os.File)
	if !ok {
		return 0
	}
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil {
		return 0
	}
	return int(ws.Col)
}

// fit cuts line to cols-1 columns (0: no limit): a line that wraps breaks the redraw
// in place, which moves the cursor by lines drawn. Runes count as one column each.
func fit(line string, cols int) string {
	if cols <= 1 {
		return line
	}
	r := []rune(line)
	if len(r) < cols {
		return line
	}
	return string(r[:cols-1])
}

func (d *drainNode) label() string {
	if d.Name != "" {
		return fmt.Sprintf("%s (%s)", d.Name, shortID(d.ID))
	}
	return d.ID
}

// shortLabel is label for a terminal line: a nameless node by its short id.
func (d *drainNode) shortLabel() string {
	if d.Name != "" {
		return d.label()
	}
	return shortID(d.ID)
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// status is a node's state in words.
func (d *drainNode) status(now time.Time) string {
	switch {
	case d.Done && d.Told && d.Outcome == protocol.DrainDrained:
		return "drained (the node reports its drain done)"
	case d.Done && d.Told && d.Outcome == protocol.DrainFailed:
		return "drain failed: " + d.Reason
	case d.Done && d.Told:
		return "node stopped; not known to be drained: it stopped without telling its drain's outcome"
	case d.Done && d.Gone && d.Partial != "":
		return "node stopped; not known to be drained: its last list was partial (" + d.Partial + ")"
	case d.Done && d.Gone:
		return "drained; node stopped"
	case d.Done:
		return "drained"
	case d.Partial != "" && !now.Before(d.Until):
		return fmt.Sprintf("%d workload(s) listed, list partial (%s); waiting", d.Left, d.Partial)
	case now.Before(d.Until):
		return fmt.Sprintf("%d workload(s) left; they stop in %s", d.Left, d.Until.Sub(now).Round(time.Second))
	}
	return fmt.Sprintf("%d workload(s) left; stopping", d.Left)
}

func (v *drainView) show(nodes []*drainNode, now time.Time) {
	if v.tty {
		// Its own cursor moves go to the terminal as they are; render escaped what
		// came from the network.
		fmt.Fprint(terminal(v.w), v.render(nodes, now))
		return
	}
	fmt.Fprint(v.w, v.render(nodes, now))
}

// render is what show prints: on a terminal the bars (moving up over the previous
// ones), otherwise a line per node whose count or outcome changed since last time.
func (v *drainView) render(nodes []*drainNode, now time.Time) string {
	var b strings.Builder
	if v.tty {
		if v.drawn > 0 {
			fmt.Fprintf(&b, "\x1b[%dA", v.drawn)
		}
		// Labels as wide as the widest; on a narrow terminal the bar shrinks first so
		// the status ("3 workload(s) left; they stop in 30s") stays readable.
		labelW := 0
		for _, n := range nodes {
			labelW = max(labelW, len([]rune(n.shortLabel())))
		}
		barW := 20
		if v.cols > 0 {
			const statusW = 36
			barW = max(5, min(barW, v.cols-1-labelW-statusW-4))
		}
		for _, n := range nodes {
			line := escapeControls(fmt.Sprintf("%-*s %s %s", labelW, n.shortLabel(), bar(n.Start, n.Left, n.Done, barW), n.status(now)))
			fmt.Fprintf(&b, "\x1b[2K%s\n", fit(line, v.cols))
		}
		v.drawn = len(nodes)
		return b.String()
	}
	for _, n := range nodes {
		// Plain mode says something when the count or the outcome changes, not each tick.
		key := fmt.Sprint(n.Left, n.Done, n.Gone, n.Killed, !now.Before(n.Until), n.Partial, n.Outcome)
		if v.last[n.ID] == key {
			continue
		}
		v.last[n.ID] = key
		fmt.Fprintf(&b, "%s  node %s: %s\n", now.Format(time.TimeOnly), n.label(), n.status(now))
	}
	return b.String()
}

// bar draws [#####-----] for the share of workloads already gone.
func bar(start, left int, done bool, width int) string {
	filled := 0
	switch {
	case done:
		filled = width
	case start > 0:
		filled = (start - left) * width / start
	}
	filled = max(0, min(width, filled))
	return "[" + strings.Repeat("#", filled) + strings.Repeat("-", width-filled) + "]"
}

// workloadSummariesByNode lists every workload by the node that answered (nexd nodes
// name themselves in a header; others are grouped under ""). With resourcesOf a nexd
// node of that id adds its workloads' cgroup figures. partial holds, by node, the
// answers that lack some nexlets' workloads, and those that lack all of them: a node's
// error answer (a list over max_payload, 413), or one that cannot be read. Before, such
// a node counted as listing none: a migration moved none of its services and said
// nothing, a drain's confirmation and top took it as empty.
func (f *fleet) workloadSummariesByNode(ctx context.Context, resourcesOf string) (byNode map[string][]protocol.WorkloadSummary, partial map[string]*partialList, err error) {
	data, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})
	subject := protocol.WPingSubject(protocol.SystemNamespace)
	opts, nonce, done := f.wpingOpts(subject, resourcesOf)
	msgs, err := f.scatterGather(ctx, subject, data, opts)
	if err != nil {
		return nil, nil, err
	}
	out := map[string][]protocol.WorkloadSummary{}
	partial = map[string]*partialList{}
	from, checks := f.checkAnswers(msgs, subject, nonce, done)
	var refused refusals
	defer refused.warn(f, "the list of every node's workloads")
	for i, m := range msgs {
		if checks[i] != nil {
			// Not the node's word (answers.go): a drain is not confirmed by it.
			refused.add(checks[i])
			continue
		}
		node := from[i].node
		if err := replyError(m); err != nil {
			partial[node] = &partialList{node: node, failed: err}
			continue
		}
		if len(m.Data) == 0 {
			continue // a node's acknowledgement (HeaderProgress), its list to come
		}
		var ws []protocol.WorkloadSummary
		if err := json.Unmarshal(m.Data, &ws); err != nil {
			partial[node] = &partialList{node: node, failed: fmt.Errorf("unreadable workload list: %w", err)}
			continue
		}
		out[node] = append(out[node], ws...)
		if p := partialOf(m); p != nil {
			partial[node] = p
		}
	}
	return out, partial, nil
}

// workloadsByNode is workloadSummariesByNode's ids.
func (f *fleet) workloadsByNode(ctx context.Context) (map[string][]string, error) {
	byNode, _, err := f.workloadSummariesByNode(ctx, "")
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for node, ws := range byNode {
		for _, w := range ws {
			out[node] = append(out[node], w.ID)
		}
	}
	return out, nil
}

// watchDrain follows the drain of nodes until each has no workloads left after its
// deadline or has shut down. Kills are counted from WORKLOADSTOPPED events (nodes with
// events = "nats") of workloads that ran on the drained nodes.
func (a *app) watchDrain(ctx context.Context, f *fleet, nodes []*drainNode, owners map[string]string, w io.Writer) error {
	var mu sync.Mutex
	sub, err := f.nc.Subscribe(protocol.EventSubject("*", protocol.EventWorkloadStopped), func(m *nats.Msg) {
		var ev protocol.WorkloadStoppedEvent
		if json.Unmarshal(m.Data, &ev) != nil || ev.Error == nil || !strings.HasPrefix(ev.Error.Message, killedPrefix) {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		for _, n := range nodes {
			if owners[ev.ID] == n.ID && !n.killed[ev.ID] {
				if n.killed == nil {
					n.killed = map[string]bool{}
				}
				n.killed[ev.ID] = true
				n.Killed++
			}
		}
	})
	if err != nil {
		return fmt.Errorf("subscribe to workload stop events: %w", err)
	}
	defer sub.Unsubscribe()
	view := newDrainView(w, isTTY(w) && !a.json)
	t := time.NewTicker(drainPoll)
	defer t.Stop()
	for {
		now := time.Now()
		all := true
		var confirm []*drainNode
		for _, n := range nodes {
			if n.Done || n.Gone {
				// A node gone stays so (waiting for its drain's outcome, if it promised
				// one): asking it again would only wait out --nats.timeout where a
				// "no responders" is not taken at once (askNode).
				continue
			}
			m, ok, err := f.askInfo(ctx, n.ID)
			switch {
			case !ok:
				n.Gone, n.Left = true, 0
			case err != nil && !f.nc.IsConnected() && !now.Before(n.Until):
				// The NATS server went away as the node stopped: it was the node's own
				// (embedded) server.
				n.Gone, n.Left = true, 0
			case err == nil:
				var info protocol.NodeInfoResponse
				if protocol.Decode(m.Data, &info) == nil {
					if n.Name == "" {
						n.Name = info.Tags[protocol.TagNode]
					}
					left := 0
					for _, s := range info.NodeAgentSummaries {
						left += s.AgentSummary.WorkloadCount
					}
					n.Left = left
					if n.Start < 0 {
						n.Start = left
					}
				}
			}
			if !n.Gone && n.Left == 0 && !now.Before(n.Until) {
				confirm = append(confirm, n)
			}
		}
		if len(confirm) > 0 {
			// The nexlets' heartbeat counts say none are left: a listing confirms it,
			// and a partial one (a nexlet that did not answer its node) is not drained.
			a.confirmDrained(ctx, f, confirm)
		}
		for _, n := range nodes {
			if !n.Done {
				n.Done = n.Gone || (n.Left == 0 && !now.Before(n.Until) && n.Partial == "")
				n.settleTold(now)
			}
			all = all && n.Done
		}
		if !a.json {
			mu.Lock()
			view.show(nodes, now)
			mu.Unlock()
		}
		if all {
			// Let stop events still in flight arrive before counting kills.
			if f.nc.IsConnected() {
				_ = f.nc.FlushTimeout(time.Second)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// settleTold makes a node that promised to tell its drain's outcome done when it told
// it, and not before: its counts at 0 do not end the wait (its own drain may still
// fail), and when it is gone its outcome is waited for tellWait, then not known.
func (d *drainNode) settleTold(now time.Time) {
	told, state, reason := d.tell.outcome()
	if !told {
		return
	}
	d.Told, d.Outcome, d.Reason = true, state, reason
	switch {
	case state != "":
		d.Done, d.Partial = true, "" // the node's drain listed whole, or says why not
		if state == protocol.DrainDrained {
			d.Left = 0
		}
	case d.Gone && d.goneAt.IsZero():
		d.goneAt, d.Done = now, false
	case d.Gone:
		d.Done = now.Sub(d.goneAt) >= tellWait
	default:
		d.Done = false
	}
}

// confirmDrained lists the workloads of nodes whose heartbeat counts reached 0: a node
// whose answer is partial, or that still lists workloads, is not drained yet.
func (a *app) confirmDrained(ctx context.Context, f *fleet, nodes []*drainNode) {
	byNode, partial, err := f.workloadSummariesByNode(ctx, "")
	if err != nil {
		return // the next round asks again
	}
	for _, n := range nodes {
		n.Partial = ""
		if p := partial[n.ID]; p != nil {
			n.Partial = p.which() // never "": a partial list is never drained
		}
		n.Left = max(n.Left, len(byNode[n.ID]))
	}
}

// watchLocalDrain follows the local node's drain over the control socket until its
// workloads are gone after the deadline or nexd has stopped; kills are counted from
// the native nexlet's "killing its group" log lines.
// partial is the last list's partial marker when nexd stopped on one and did not log
// its drain done without errors ("lame duck drain done", errors 0: every workload it
// held or listed confirmed stopped, and a whole list; a partial list is one of its
// errors) before it stopped.
func (a *app) watchLocalDrain(ctx context.Context, until time.Time) (killed int, partial string, err error) {
	c := a.client()
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		return 0, "", err
	}
	n := &drainNode{ID: st.NodeID, Name: st.Name, Until: until, Start: -1}
	fctx, cancel := context.WithCancel(ctx)
	var mu sync.Mutex
	var wg sync.WaitGroup
	drainOK := false // nexd logged its drain done without errors
	followed := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(followed)
		_ = c.FollowLogs(fctx, control.LogQuery{Follow: true}, func(l control.LogLine) error {
			mu.Lock()
			defer mu.Unlock()
			switch {
			case strings.Contains(l.Msg, "killing its group"):
				killed++
			case l.Msg == "lame duck drain done" && fmt.Sprint(l.Attrs["errors"]) == "0":
				drainOK = true
			}
			return nil
		})
	}()
	defer func() { cancel(); wg.Wait() }()
	view := newDrainView(a.out(), isTTY(a.out()) && !a.json)
	t := time.NewTicker(drainPoll)
	defer t.Stop()
	for {
		now := time.Now()
		ws, err := c.Workloads(ctx)
		var ae *control.APIError
		var partial *control.PartialList
		switch {
		case err == nil || errors.As(err, &partial):
			n.Left, n.Partial = len(ws), ""
			if partial != nil {
				n.Partial = protocol.MissingText(partial.Missing)
			}
			if n.Start < 0 {
				n.Start = n.Left
			}
		case errors.As(err, &ae):
			return 0, "", err
		default:
			n.Gone, n.Left = true, 0 // the socket is gone: nexd stopped
			if n.Partial != "" {
				// Its log feed ends with the socket: read to its end whether nexd
				// confirmed the drain itself.
				select {
				case <-followed:
				case <-time.After(2 * time.Second):
				}
				mu.Lock()
				if drainOK {
					n.Partial = ""
				}
				mu.Unlock()
			}
		}
		n.Done = n.Gone || (n.Left == 0 && !now.Before(n.Until) && n.Partial == "")
		if !a.json {
			view.show([]*drainNode{n}, now)
		}
		if n.Done {
			cancel()
			wg.Wait()
			mu.Lock()
			defer mu.Unlock()
			return killed, n.Partial, nil
		}
		select {
		case <-ctx.Done():
			return 0, "", ctx.Err()
		case <-t.C:
		}
	}
}

// deployProgress prints a node's progress reports during a deploy on stderr: one line
// redrawn in place on a terminal (with a bar for a download's bytes), a line per new
// report otherwise, {"progress": ...} under --json.
type deployProgress struct {
	a    *app
	tty  bool
	cols int // terminal width (0: unknown)
	last protocol.Progress
	seen bool
}

func (a *app) newDeployProgress() *deployProgress {
	p := &deployProgress{a: a, tty: isTTY(a.io.Stderr) && !a.json}
	if p.tty {
		p.cols = termWidth(a.io.Stderr)
	}
	return p
}

// progressOf reads a progress report's headers.
func progressOf(h nats.Header) protocol.Progress {
	p := protocol.Progress{Text: h.Get(protocol.HeaderProgress)}
	if d, t, ok := protocol.ParseProgressBytes(h.Get(protocol.HeaderProgressBytes)); ok {
		p.Done, p.Total = d, t
	}
	return p
}

func (p *deployProgress) show(r protocol.Progress) {
	if p.seen && r == p.last {
		return
	}
	p.last, p.seen = r, true
	w := p.a.io.Stderr
	switch {
	case p.a.json:
		out := map[string]any{"progress": r.Text}
		if r.HasBytes() {
			out["bytes_done"], out["bytes_total"] = r.Done, r.Total
		}
		b, _ := json.Marshal(out)
		fmt.Fprintln(w, string(b))
	case p.tty:
		fmt.Fprint(terminal(w), "\r\x1b[2K"+escapeControls(progressLine(r, true, p.cols)))
	default:
		fmt.Fprintln(w, progressLine(r, false, 0))
	}
}

// progressLine is how a deploy's progress report reads: with a bar and sizes on a
// terminal (cols wide, 0: unknown; the text is cut, not the bar), exact byte counts
// otherwise.
func progressLine(r protocol.Progress, tty bool, cols int) string {
	line := "nexctl: deploying: " + r.Text
	suffix := ""
	switch {
	case !r.HasBytes():
	case r.Total <= 0 && tty:
		suffix = " " + sizeText(r.Done)
	case r.Total <= 0:
		return fmt.Sprintf("%s: %d bytes", line, r.Done)
	case tty:
		suffix = fmt.Sprintf(" %s %s / %s", bar(int(r.Total), int(r.Total-r.Done), r.Done >= r.Total, 20),
			sizeText(r.Done), sizeText(r.Total))
	default:
		return fmt.Sprintf("%s: %d of %d bytes (%d%%)", line, r.Done, r.Total, r.Done*100/r.Total)
	}
	if tty && cols > 1 {
		room := cols - 1 - len([]rune(suffix))
		if rl := []rune(line); room > 0 && len(rl) > room {
			line = string(rl[:room-1]) + "…"
		}
		return fit(line+suffix, cols)
	}
	return line + suffix
}

// sizeText is a byte count for people: 512 B, 3.4 KiB, 12.0 MiB.
func sizeText(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// done ends an in-place progress line.
func (p *deployProgress) done() {
	if p.tty && p.seen {
		fmt.Fprintln(p.a.io.Stderr)
	}
	p.last, p.seen = protocol.Progress{}, false
}
