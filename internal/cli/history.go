package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/journalread"
	"github.com/nexd-project/nexd/internal/logstream"
)

// workloadOutputMsg is the log message the native nexlet gives each line of workload
// output (the line itself is its "line" attribute).
const workloadOutputMsg = journalread.OutputMsg

// parseSince takes a duration back from now ("10m") or an RFC 3339 time.
func parseSince(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("--since %s must not be negative", s)
		}
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("--since %q is neither a duration (10m) nor an RFC 3339 time", s)
}

// keep applies --since and --tail to lines in time order.
func keep(lines []logstream.Line, since time.Time, tail int) []logstream.Line {
	out := lines[:0:0]
	for _, l := range lines {
		if since.IsZero() || !l.Time.Before(since) {
			out = append(out, l)
		}
	}
	if tail > 0 && len(out) > tail {
		out = out[len(out)-tail:]
	}
	return out
}

// nodeLogLines asks the local node for a workload's past output: nexd reads this host's
// journal for its admins (nexctl's user often may not), else its recent log buffer.
// source says which, as far as the node tells (older nodes answer from their buffer).
func nodeLogLines(ctx context.Context, c *control.Client, id string, since time.Time, tail int) (lines []logstream.Line, source string, err error) {
	recs, err := c.Logs(ctx, control.LogQuery{Workload: id, History: true, Since: since, Lines: tail})
	if err != nil {
		return nil, "", err
	}
	source = "the local node's log buffer"
	for _, r := range recs {
		if r.Msg != workloadOutputMsg {
			continue
		}
		l := logstream.Line{Time: r.Time}
		l.Line, _ = r.Attrs["line"].(string)
		for _, k := range []string{"nexlet_stream", "stream"} {
			if s, ok := r.Attrs[k].(string); ok {
				l.Stream = s
				break
			}
		}
		if r.Attrs["source"] == "journal" {
			source = "the journal (read by the local node)"
		}
		lines = append(lines, l)
	}
	return lines, source, nil
}

// workloadHistory finds a workload's past output: in this host's journal, in the local
// node's log buffer, or in the log stream (log_stream), in that order. from names the
// source.
func (a *app) workloadHistory(ctx context.Context, f *fleet, ns, id string, since time.Time, tail int) (lines []logstream.Line, from string, err error) {
	// The journal as this user may read it (root, systemd-journal), then through the
	// local node, which may read it for its admins. A source that has the workload but
	// nothing since --since is the answer too: an empty one.
	uid := a.nodeUID()
	if ls, err := journalread.WorkloadOutput(ctx, id, uid, since, tail); err == nil && len(ls) > 0 {
		return keep(ls, since, tail), "the journal", nil
	} else if err == nil && !since.IsZero() {
		if seen, err := journalread.WorkloadOutput(ctx, id, uid, time.Time{}, 1); err == nil && len(seen) > 0 {
			return nil, "the journal since " + since.Format(time.RFC3339), nil
		}
	}
	c := a.client()
	defer c.Close()
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if ls, source, err := nodeLogLines(cctx, c, id, since, tail); err == nil && len(ls) > 0 {
		return keep(ls, since, tail), source, nil
	} else if err == nil && !since.IsZero() {
		if seen, source, err := nodeLogLines(cctx, c, id, time.Time{}, 1); err == nil && len(seen) > 0 {
			return nil, source + " since " + since.Format(time.RFC3339), nil
		}
	}
	js, err := f.jetstream()
	if err != nil {
		return nil, "", err
	}
	rctx, stop := f.refusable(ctx, f.jsAPIPrefix())
	ls, err := logstream.Read(rctx, js, ns, id, since, tail)
	if refused := stop(); refused != nil {
		return nil, "", jsRefused("read the log stream "+logstream.Stream, refused)
	}
	switch {
	case errors.Is(err, logstream.ErrNoStream):
		return nil, "", fmt.Errorf("no history for workload %s: it left no lines in this host's journal or node, and no node keeps a log stream; set log_stream = true in the nodes' config (or follow the live output with -f)", id)
	case err != nil:
		return nil, "", err
	}
	return ls, "log stream " + logstream.Stream, nil
}

// nodeUID is the uid the local nexd runs as, whose journal entries alone are workload
// output: the owner of its control socket (nexd's, or root's under socket activation,
// where nexd runs as root), else root, the packaged default.
func (a *app) nodeUID() int {
	a.resolved()
	if fi, err := os.Stat(a.socket); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			return int(st.Uid)
		}
	}
	return 0
}

// printLogLine writes one line of workload output: stdout and stderr to ours, or a
// JSON object under --json.
func (a *app) printLogLine(l logstream.Line) error {
	if a.json {
		b, _ := json.Marshal(l)
		_, err := fmt.Fprintln(a.out(), string(b))
		return err
	}
	w := a.out()
	if l.Stream == "stderr" {
		w = a.io.Stderr
	}
	_, err := fmt.Fprintln(w, strings.TrimRight(l.Line, "\n"))
	return err
}
