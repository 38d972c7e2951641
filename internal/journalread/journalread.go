// Package journalread reads a workload's past output back from this host's systemd
// journal, where nexd logs each line (logger.target journal, the default under
// systemd) with NEX_WORKLOAD_ID, LINE and NEXLET_STREAM. It runs journalctl, so it
// sees what the calling user may read: root and the systemd-journal group everything,
// others only their own entries (none of nexd's). nexctl calls it as the user; nexd
// calls it for admins of its control socket.
package journalread

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"time"

	"github.com/nexd-project/nexd/internal/logstream"
)

// OutputMsg is the message of a workload output entry (the native nexlet's log line
// for each line its workloads write; the line itself is the LINE field).
const OutputMsg = "workload output"

// WorkloadOutput returns workload id's output lines since since (zero: all) in time
// order, only the last tail of them when tail > 0, as logged by nexd running as uid
// nexdUID. A host without journalctl is an error; a journal without the workload, or
// one the caller may not read, gives none.
//
// Only entries whose sender had nexd's uid count: any local user and any workload may
// send journal entries with fields of their choosing (logger --journald), so
// NEX_WORKLOAD_ID and MESSAGE alone would show their forged lines as a workload's
// output. _UID is journald's own field, which no sender can set.
func WorkloadOutput(ctx context.Context, id string, nexdUID int, since time.Time, tail int) ([]logstream.Line, error) {
	return workloadOutput(ctx, "journalctl", id, nexdUID, since, tail)
}

func workloadOutput(ctx context.Context, journalctl, id string, nexdUID int, since time.Time, tail int) ([]logstream.Line, error) {
	path, err := exec.LookPath(journalctl)
	if err != nil {
		return nil, err
	}
	args := []string{"--no-pager", "-q", "-o", "json", "NEX_WORKLOAD_ID=" + id, "MESSAGE=" + OutputMsg,
		"_UID=" + strconv.Itoa(nexdUID)}
	if !since.IsZero() {
		// Whole seconds (journalctl's @<epoch>); the exact time is cut below.
		args = append(args, "--since", "@"+strconv.FormatInt(since.Unix(), 10))
	} else if tail > 0 {
		// Only without --since: with it, journalctl's -n counts from the start of the
		// range (systemd 252 printed the first line for --since 1h -n 1).
		args = append(args, "-n", strconv.Itoa(tail))
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, path, args...).Output()
	if err != nil && len(out) == 0 {
		// journalctl fails when it may open no journal file at all (a user outside
		// systemd-journal on a host without persistent user journals): nothing to see.
		if _, ok := err.(*exec.ExitError); ok {
			return nil, nil
		}
		return nil, fmt.Errorf("journalctl: %w", err)
	}
	lines, err := parse(out)
	if err != nil {
		return nil, err
	}
	kept := lines[:0]
	for _, l := range lines {
		if !l.Time.Before(since) {
			kept = append(kept, l)
		}
	}
	if tail > 0 && len(kept) > tail {
		kept = kept[len(kept)-tail:]
	}
	return kept, nil
}

// parse reads journalctl's JSON lines; an entry whose LINE is not text (journalctl
// shows such values as arrays of bytes) is skipped.
func parse(out []byte) ([]logstream.Line, error) {
	var lines []logstream.Line
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		str := func(k string) string { s, _ := e[k].(string); return s }
		text, ok := e["LINE"].(string)
		if !ok {
			continue
		}
		l := logstream.Line{Line: text, Stream: str("NEXLET_STREAM")}
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
