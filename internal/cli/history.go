package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/logstream"
)

// workloadOutputMsg is the log message the native nexlet gives each line of workload
// output (the line itself is its "line" attribute).
const workloadOutputMsg = "workload output"

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

// journalLines reads a workload's output from the systemd journal of this host, where
// nexd logs it with NEX_WORKLOAD_ID (logger.target journal, the default under systemd).
func journalLines(ctx context.Context, id string, since time.Time, tail int) ([]logstream.Line, error) {
	path, err := exec.LookPath("journalctl")
	if err != nil {
		return nil, err
	}
	args := []string{"--no-pager", "-q", "-o", "json", "NEX_WORKLOAD_ID=" + id, "MESSAGE=" + workloadOutputMsg}
	if !since.IsZero() {
		args = append(args, "--since", "@"+strconv.FormatInt(since.Unix(), 10))
	}
	if tail > 0 {
		args = append(args, "-n", strconv.Itoa(tail))
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, path, args...).Output()
	if err != nil {
		return nil, fmt.Errorf("journalctl: %w", err)
	}
	var lines []logstream.Line
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		str := func(k string) string { s, _ := e[k].(string); return s }
		l := logstream.Line{Line: str("LINE"), Stream: str("NEXLET_STREAM")}
		if l.Stream == "" {
			l.Stream = str("STREAM")
		}
		if us, err := strconv.ParseInt(str("__REALTIME_TIMESTAMP"), 10, 64); err == nil {
			l.Time = time.UnixMicro(us)
		}
		lines = append(lines, l)
	}
	return lines, sc.Err()
}

// nodeLogLines reads a workload's output from the local node's recent log buffer.
func nodeLogLines(ctx context.Context, c *control.Client, id string) ([]logstream.Line, error) {
	recs, err := c.Logs(ctx, control.LogQuery{Workload: id})
	if err != nil {
		return nil, err
	}
	var out []logstream.Line
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
		out = append(out, l)
	}
	return out, nil
}

// workloadHistory finds a workload's past output: in this host's journal, in the local
// node's log buffer, or in the log stream (log_stream), in that order. from names the
// source.
func (a *app) workloadHistory(ctx context.Context, f *fleet, ns, id string, since time.Time, tail int) (lines []logstream.Line, from string, err error) {
	if ls, err := journalLines(ctx, id, since, tail); err == nil {
		if len(ls) > 0 {
			return keep(ls, since, tail), "journal", nil
		}
		// Nothing since then: still the journal's answer if it has the workload at all.
		if !since.IsZero() {
			if any, err := journalLines(ctx, id, time.Time{}, 1); err == nil && len(any) > 0 {
				return nil, "the journal since " + since.Format(time.RFC3339), nil
			}
		}
	}
	c := a.client()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	ls, lerr := nodeLogLines(cctx, c, id)
	cancel()
	c.Close()
	if lerr == nil && len(ls) > 0 {
		return keep(ls, since, tail), "the local node's log buffer", nil
	}
	js, err := f.jetstream()
	if err != nil {
		return nil, "", err
	}
	ls, err = logstream.Read(ctx, js, ns, id, since, tail)
	switch {
	case errors.Is(err, logstream.ErrNoStream):
		return nil, "", fmt.Errorf("no history for workload %s: it left no lines in this host's journal or node, and no node keeps a log stream; set log_stream = true in the nodes' config (or follow the live output with -f)", id)
	case err != nil:
		return nil, "", err
	}
	return ls, "log stream " + logstream.Stream, nil
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
