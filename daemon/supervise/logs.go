package supervise

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxLine caps one logged line; the rest of an overlong line is dropped.
const maxLine = 16 << 10

// pump logs each line of a nexlet's stdout or stderr as one record with nexlet=<name>
// (the journald handler maps it to NEX_NEXLET), until the pipe closes.
func (n *nexlet) pump(r io.Reader, stream string) {
	def := slog.LevelInfo
	if stream == "stderr" {
		def = slog.LevelWarn
	}
	br := bufio.NewReaderSize(r, maxLine)
	for {
		line, err := readLine(br)
		if len(line) > 0 || err == nil {
			n.read.Add(1)
			n.emit(line, stream, def)
		}
		if err != nil {
			return
		}
	}
}

// readLine reads one line without its newline, truncated to maxLine.
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		out := bytes.Clone(line)
		for errors.Is(err, bufio.ErrBufferFull) { // skip the rest of the line
			_, err = br.ReadSlice('\n')
		}
		return out, err
	}
	return bytes.TrimRight(line, "\r\n"), err
}

func (n *nexlet) emit(line []byte, stream string, def slog.Level) {
	// A workload's output (relayed by its nexlet) has a bucket of its own, so a noisy
	// workload never silences the nexlet's own lines; the check reads only bytes, so a
	// dropped line costs no parsing.
	if id := workloadOf(line); id != "" {
		if !n.limiter.allowWorkload(n.s.log, n.spec.Name, id) {
			return
		}
	} else if !n.limiter.allow(n.s.log, n.spec.Name) {
		return
	}
	if level, ok := slogLevel(line); ok && !n.s.log.Enabled(context.Background(), level) {
		return // as parseLine would read it, without its decode (BenchmarkNexletLine)
	}
	level, msg, attrs := parseLine(line, def)
	args := append([]any{"nexlet", n.spec.Name, "stream", stream}, attrs...)
	n.s.log.Log(context.Background(), level, msg, args...)
}

// slogLevel reads the level of a line as slog's JSON handler writes it, the layout of
// nexd's nexlets ({"time":"…","level":"…","msg":"…), without decoding it: a line below
// nexd's level is dropped for a few nanoseconds instead of a JSON decode into a map.
// It gives the level parseLine would; ok is false for any other line.
func slogLevel(line []byte) (slog.Level, bool) {
	rest, ok := bytes.CutPrefix(line, []byte(`{"time":"`))
	if ok {
		i := bytes.IndexByte(rest, '"')
		if i < 0 || bytes.IndexByte(rest[:i], '\\') >= 0 {
			return 0, false
		}
		rest, ok = bytes.CutPrefix(rest[i+1:], []byte(`,"level":"`))
	} else {
		rest, ok = bytes.CutPrefix(line, []byte(`{"level":"`))
	}
	if !ok {
		return 0, false
	}
	i := bytes.IndexByte(rest, '"')
	if i < 0 || bytes.IndexByte(rest[:i], '\\') >= 0 || !bytes.HasPrefix(rest[i+1:], []byte(`,"msg":"`)) {
		return 0, false
	}
	return levelName(string(rest[:i]))
}

// parseLine picks the level of a line: a JSON object with "level" and "msg" (as slog's
// JSON handler writes), an sd-daemon "<N>" prefix, or a "[LEVEL]"/"LEVEL:" prefix;
// otherwise the stream's default.
func parseLine(line []byte, def slog.Level) (slog.Level, string, []any) {
	if len(line) > 1 && line[0] == '{' {
		var obj map[string]any
		if json.Unmarshal(line, &obj) == nil {
			if msg, ok := obj["msg"].(string); ok {
				level := def
				if l, ok := obj["level"].(string); ok {
					if lv, ok := levelName(l); ok {
						level = lv
					}
				}
				// A second "level" (a rogue nexlet's) is the decoder's; the first is
				// what slogLevel dropped the line by, and so is its level here too.
				if lv, ok := slogLevel(line); ok {
					level = lv
				}
				var keys []string
				for k := range obj {
					if k != "msg" && k != "level" && k != "time" {
						keys = append(keys, k)
					}
				}
				sort.Strings(keys)
				var attrs []any
				for _, k := range keys {
					attrs = append(attrs, childKey(k), obj[k])
				}
				return level, msg, attrs
			}
		}
	}
	// A record in slog's layout that does not decode (cut at maxLine, mostly: a long
	// workload output line) keeps the level it names, whole as its message: slogLevel
	// decided its drop by that level, and the stream's default instead logged a cut
	// INFO record of the native nexlet as WARN (FuzzParseLine).
	if level, ok := slogLevel(line); ok {
		return level, string(line), nil
	}
	if level, msg, attrs, ok := parseLogfmt(string(line), def); ok {
		return level, msg, attrs
	}
	s := string(line)
	if len(s) >= 3 && s[0] == '<' && s[2] == '>' && s[1] >= '0' && s[1] <= '7' {
		level := slog.LevelInfo
		switch {
		case s[1] <= '3':
			level = slog.LevelError
		case s[1] == '4':
			level = slog.LevelWarn
		case s[1] == '7':
			level = slog.LevelDebug
		}
		return level, s[3:], nil
	}
	if strings.HasPrefix(s, "[") {
		if tag, rest, ok := strings.Cut(s[1:], "]"); ok {
			if lv, ok := levelName(tag); ok {
				return lv, strings.TrimPrefix(rest, " "), nil
			}
		}
	}
	if tag, rest, ok := strings.Cut(s, ":"); ok && len(tag) <= 7 {
		if lv, ok := levelName(tag); ok {
			return lv, strings.TrimPrefix(rest, " "), nil
		}
	}
	return def, s, nil
}

// childKey renames the attributes nexd puts on a nexlet's lines itself (nexlet, stream,
// and pid when logger.with_pid is on) to nexlet_<key>, so a record never carries a key
// twice. A switch, not a package-level map, which the package's init would build in the
// native nexlet too (docs/performance-notes.md, Memory).
func childKey(k string) string {
	switch k {
	case "nexlet", "stream", "pid":
		return "nexlet_" + k
	}
	return k
}

// parseLogfmt reads a line as slog's text handler writes it (time=… level=INFO
// msg="…" k=v …); ok is false unless it has both level and msg.
func parseLogfmt(s string, def slog.Level) (slog.Level, string, []any, bool) {
	if !strings.HasPrefix(s, "time=") && !strings.HasPrefix(s, "level=") {
		return def, "", nil, false
	}
	level, msg := def, ""
	var haveLevel, haveMsg bool
	var attrs []any
	for s != "" {
		s = strings.TrimLeft(s, " ")
		key, rest, ok := strings.Cut(s, "=")
		if !ok || key == "" || strings.ContainsAny(key, " \"") {
			return def, "", nil, false
		}
		var val string
		if strings.HasPrefix(rest, "\"") {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return def, "", nil, false
			}
			val, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			val, rest, _ = strings.Cut(rest, " ")
		}
		s = rest
		switch key {
		case "time":
		case "level":
			if lv, ok := levelName(val); ok {
				level, haveLevel = lv, true
			}
		case "msg":
			msg, haveMsg = val, true
		default:
			attrs = append(attrs, childKey(key), val)
		}
	}
	if !haveLevel || !haveMsg {
		return def, "", nil, false
	}
	return level, msg, attrs, true
}

func levelName(s string) (slog.Level, bool) {
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "DEBUG", "TRACE":
		return slog.LevelDebug, true
	case "INFO":
		return slog.LevelInfo, true
	case "WARN", "WARNING":
		return slog.LevelWarn, true
	case "ERROR", "ERR", "FATAL", "PANIC", "CRIT", "CRITICAL":
		return slog.LevelError, true
	}
	return 0, false
}

// workloadOf returns the workload id of a line a nexlet relays from a workload (it
// carries workload_id=<id> or "workload_id":"<id>"), or "".
func workloadOf(line []byte) string {
	for _, key := range [][]byte{[]byte("workload_id="), []byte(`"workload_id":"`)} {
		i := bytes.Index(line, key)
		if i < 0 {
			continue
		}
		rest := line[i+len(key):]
		end := bytes.IndexAny(rest, "\" \t")
		if end < 0 {
			end = len(rest)
		}
		if end > 0 && end <= 64 {
			return string(rest[:end])
		}
	}
	return ""
}

// noteEvery is how often a limiter reports what it dropped: one line per interval per
// source, not one per line let through.
const noteEvery = 10 * time.Second

// maxWorkloadBuckets bounds the per-workload buckets of one nexlet; past it they are
// forgotten (and start full again).
const maxWorkloadBuckets = 4096

// limiter holds the token buckets of one nexlet's output: one for the nexlet's own
// lines and one per workload whose output the nexlet relays, each with the same rate
// and burst. Dropped lines are counted and reported once per noteEvery.
type limiter struct {
	rate  float64
	burst float64

	mu        sync.Mutex
	own       bucket
	workloads map[string]*bucket
}

type bucket struct {
	tokens  float64
	last    time.Time
	dropped int
	noted   time.Time // when dropped lines were last reported
}

func newLimiter(rate float64, burst int) *limiter {
	now := time.Now()
	return &limiter{rate: rate, burst: float64(burst), own: bucket{tokens: float64(burst), last: now, noted: now},
		workloads: map[string]*bucket{}}
}

// take takes a token from b; report is the count of dropped lines to report now.
func (l *limiter) take(b *bucket, now time.Time) (ok bool, report int) {
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	ok = b.tokens >= 1
	if ok {
		b.tokens--
	} else {
		b.dropped++
	}
	if b.dropped > 0 && now.Sub(b.noted) >= noteEvery {
		report, b.dropped, b.noted = b.dropped, 0, now
	}
	return ok, report
}

// allow takes a token for one of the nexlet's own lines.
func (l *limiter) allow(log *slog.Logger, name string) bool {
	l.mu.Lock()
	ok, report := l.take(&l.own, time.Now())
	l.mu.Unlock()
	if report > 0 {
		log.Warn("nexlet output rate-limited", "nexlet", name, "suppressed", report, "interval", noteEvery.String())
	}
	return ok
}

// allowWorkload takes a token for one line of workload id's output.
func (l *limiter) allowWorkload(log *slog.Logger, name, id string) bool {
	now := time.Now()
	l.mu.Lock()
	b := l.workloads[id]
	if b == nil {
		if len(l.workloads) >= maxWorkloadBuckets {
			clear(l.workloads)
		}
		b = &bucket{tokens: l.burst, last: now, noted: now}
		l.workloads[id] = b
	}
	ok, report := l.take(b, now)
	l.mu.Unlock()
	if report > 0 {
		log.Warn("workload output rate-limited", "nexlet", name, "workload_id", id, "suppressed", report, "interval", noteEvery.String())
	}
	return ok
}

// flush reports lines dropped since the last note (when the process ends).
func (l *limiter) flush(log *slog.Logger, name string) {
	l.mu.Lock()
	dropped := l.own.dropped
	l.own.dropped = 0
	wl := map[string]int{}
	for id, b := range l.workloads {
		if b.dropped > 0 {
			wl[id] = b.dropped
		}
	}
	clear(l.workloads)
	l.mu.Unlock()
	if dropped > 0 {
		log.Warn("nexlet output rate-limited", "nexlet", name, "suppressed", dropped)
	}
	for id, d := range wl {
		log.Warn("workload output rate-limited", "nexlet", name, "workload_id", id, "suppressed", d)
	}
}
