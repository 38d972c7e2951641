package supervise

import (
	"log/slog"
	"testing"
)

// FuzzParseLine reads arbitrary lines of a nexlet's output (a rogue or broken nexlet
// writes anything): no panic, the level read without decoding (slogLevel, which decides
// the line's drop) is the one parseLine decodes whenever it reads one, the message is
// never lost for a line that is not a record or a level tag alone, and attributes come in pairs
// with none of the keys nexd sets itself.
func FuzzParseLine(f *testing.F) {
	for _, s := range []string{
		`{"time":"2026-12-02T03:57:18.123456789Z","level":"INFO","msg":"workload output","workload_id":"W1","namespace":"system","stream":"stdout","line":"x"}`,
		`{"time":"a\",\"level\":\"DEBUG\",\"msg\":\"x","level":"ERROR","msg":"m"}`,
		`{"level":"DEBUG\",\"msg\":\"","msg":"x"}`,
		`{"msg":"x","level":"DEBUG","nexlet":"evil","pid":1}`,
		`time=2026-01-01T00:00:00Z level=WARN msg="a \"quoted\" msg" k=v workload_id=W2`,
		`level=DEBUG msg=x`,
		`<3>disk on fire`,
		`[ERROR] bad`,
		`warn: careful`,
		`plain text`,
		`{"level":"INFO","msg":"x","level":"DEBUG"}`,
		`{"level":"INFO","msg":"a","msg":5}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		level, msg, attrs := parseLine(line, slog.LevelWarn)
		if fast, ok := slogLevel(line); ok && fast != level {
			t.Fatalf("%q: slogLevel reads %v, parseLine %v", line, fast, level)
		}
		if len(attrs)%2 != 0 {
			t.Fatalf("%q: odd attributes %v", line, attrs)
		}
		for i := 0; i < len(attrs); i += 2 {
			switch attrs[i] {
			case "nexlet", "stream", "pid":
				t.Fatalf("%q: attribute %v would repeat one nexd sets", line, attrs[i])
			}
		}
		if len(line) > 0 && line[0] != '{' && line[0] != '<' && line[0] != '[' && msg == "" && !hasLevelTag(line) {
			t.Fatalf("%q: read with no message", line)
		}
		_ = workloadOf(line)
	})
}

// hasLevelTag says whether a line is a level and its separator alone, or a logfmt
// record without a msg value: the lines parseLine may read with no message.
func hasLevelTag(line []byte) bool {
	for i, c := range line {
		if c == ':' || c == '=' {
			_, ok := levelName(string(line[:i]))
			return ok || string(line[:i]) == "time" || string(line[:i]) == "level"
		}
	}
	return false
}
