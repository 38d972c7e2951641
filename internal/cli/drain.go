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

// isTTY reports whether w is a terminal (progress bars redraw in place there).
func isTTY(w io.Writer) bool {
	f, ok := w.(*os.File)
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
}

// drainView prints a drain: a bar per node redrawn in place on a terminal, a plain line
// per change otherwise.
type drainView struct {
	w     io.Writer
	tty   bool
	drawn int               // lines drawn last time (tty)
	last  map[string]string // last plain line per node
}

func newDrainView(w io.Writer, tty bool) *drainView {
	return &drainView{w: w, tty: tty, last: map[string]string{}}
}

func (d *drainNode) label() string {
	if d.Name != "" {
		return fmt.Sprintf("%s (%s)", d.Name, shortID(d.ID))
	}
	return d.ID
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
	case d.Done && d.Gone:
		return "drained; node stopped"
	case d.Done:
		return "drained"
	case now.Before(d.Until):
		return fmt.Sprintf("%d workload(s) left; they stop in %s", d.Left, d.Until.Sub(now).Round(time.Second))
	}
	return fmt.Sprintf("%d workload(s) left; stopping", d.Left)
}

func (v *drainView) show(nodes []*drainNode, now time.Time) {
	if v.tty {
		if v.drawn > 0 {
			fmt.Fprintf(v.w, "\x1b[%dA", v.drawn)
		}
		for _, n := range nodes {
			fmt.Fprintf(v.w, "\x1b[2K%-30s %s %s\n", n.label(), bar(n.Start, n.Left, n.Done, 20), n.status(now))
		}
		v.drawn = len(nodes)
		return
	}
	for _, n := range nodes {
		// Plain mode says something when the count or the outcome changes, not each tick.
		key := fmt.Sprint(n.Left, n.Done, n.Gone, n.Killed, !now.Before(n.Until))
		if v.last[n.ID] == key {
			continue
		}
		v.last[n.ID] = key
		fmt.Fprintf(v.w, "%s  node %s: %s\n", now.Format(time.TimeOnly), n.label(), n.status(now))
	}
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
// name themselves in a header; others are grouped under "").
func (f *fleet) workloadSummariesByNode(ctx context.Context) (map[string][]protocol.WorkloadSummary, error) {
	data, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace, Filter: []string{}})
	msgs, err := gather(ctx, f.nc, protocol.WPingSubject(protocol.SystemNamespace), data, f.gatherOpts(0))
	if err != nil {
		return nil, err
	}
	out := map[string][]protocol.WorkloadSummary{}
	for _, m := range msgs {
		var ws []protocol.WorkloadSummary
		if replyError(m) != nil || json.Unmarshal(m.Data, &ws) != nil {
			continue
		}
		node := ""
		if m.Header != nil {
			node = m.Header.Get(protocol.HeaderNode)
		}
		out[node] = append(out[node], ws...)
	}
	return out, nil
}

// workloadsByNode is workloadSummariesByNode's ids.
func (f *fleet) workloadsByNode(ctx context.Context) (map[string][]string, error) {
	byNode, err := f.workloadSummariesByNode(ctx)
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
			if owners[ev.ID] == n.ID {
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
		for _, n := range nodes {
			if n.Done {
				continue
			}
			m, ok, err := f.request(ctx, protocol.InfoSubject(n.ID), protocol.NodeInfoRequest{}, f.first)
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
			n.Done = n.Gone || (n.Left == 0 && !now.Before(n.Until))
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

// watchLocalDrain follows the local node's drain over the control socket until its
// workloads are gone after the deadline or nexd has stopped; kills are counted from
// the native nexlet's "killing its group" log lines.
func (a *app) watchLocalDrain(ctx context.Context, until time.Time) (killed int, err error) {
	c := a.client()
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		return 0, err
	}
	n := &drainNode{ID: st.NodeID, Name: st.Name, Until: until, Start: -1}
	fctx, cancel := context.WithCancel(ctx)
	var mu sync.Mutex
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = c.FollowLogs(fctx, control.LogQuery{Follow: true}, func(l control.LogLine) error {
			if strings.Contains(l.Msg, "killing its group") {
				mu.Lock()
				killed++
				mu.Unlock()
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
		switch {
		case err == nil:
			n.Left = len(ws)
			if n.Start < 0 {
				n.Start = n.Left
			}
		case errors.As(err, &ae):
			return 0, err
		default:
			n.Gone, n.Left = true, 0 // the socket is gone: nexd stopped
		}
		n.Done = n.Gone || (n.Left == 0 && !now.Before(n.Until))
		if !a.json {
			view.show([]*drainNode{n}, now)
		}
		if n.Done {
			cancel()
			wg.Wait()
			mu.Lock()
			defer mu.Unlock()
			return killed, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
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
	last protocol.Progress
	seen bool
}

func (a *app) newDeployProgress() *deployProgress {
	return &deployProgress{a: a, tty: isTTY(a.io.Stderr) && !a.json}
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
		fmt.Fprintf(w, "\r\x1b[2K%s", progressLine(r, true))
	default:
		fmt.Fprintln(w, progressLine(r, false))
	}
}

// progressLine is how a deploy's progress report reads: with a bar and sizes on a
// terminal, exact byte counts otherwise.
func progressLine(r protocol.Progress, tty bool) string {
	line := "nexctl: deploying: " + r.Text
	switch {
	case !r.HasBytes():
		return line
	case r.Total <= 0:
		if tty {
			return fmt.Sprintf("%s %s", line, sizeText(r.Done))
		}
		return fmt.Sprintf("%s: %d bytes", line, r.Done)
	case tty:
		return fmt.Sprintf("%s %s %s / %s", line, bar(int(r.Total), int(r.Total-r.Done), r.Done >= r.Total, 20),
			sizeText(r.Done), sizeText(r.Total))
	}
	return fmt.Sprintf("%s: %d of %d bytes (%d%%)", line, r.Done, r.Total, r.Done*100/r.Total)
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
