package supervise

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"testing"
)

// BenchmarkNexletLine is what nexd spends on one line of a nexlet's output once read
// (parse, rate limit, log), for a native nexlet's "workload output" line: with nexd at
// warn the line is parsed and dropped, work (and a wake-up of nexd) that the nexlet
// logging at nexd's level (NEX_NATIVE_LOG_LEVEL) saves on every deploy.
func BenchmarkNexletLine(b *testing.B) {
	line := []byte(`{"time":"2026-12-02T03:57:18.123456789Z","level":"INFO","msg":"workload output","workload_id":"ItU2sERQ4SBURqIa0SNEZr","namespace":"system","stream":"stdout","line":"nexbench-ready"}`)
	for _, c := range []struct {
		name  string
		level slog.Level
	}{{"nexd=warn", slog.LevelWarn}, {"nexd=info", slog.LevelInfo}} {
		b.Run(c.name, func(b *testing.B) {
			log := slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: c.level}))
			n := &nexlet{s: &Supervisor{log: log}, spec: Spec{Name: "native"}, limiter: newLimiter(1e12, 1<<30)}
			b.ReportAllocs()
			for b.Loop() {
				n.emit(line, "stderr", slog.LevelWarn)
			}
		})
	}
}

// TestSlogLevelAgreesWithParseLine: the level read without decoding is the one
// parseLine decodes, for every line slog's JSON handler writes (messages and values with
// quotes, a group with a "level" of its own), and other lines are left to parseLine.
func TestSlogLevelAgreesWithParseLine(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	for _, l := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError} {
		log.Log(context.Background(), l, `say "hi"`, "line", `{"level":"DEBUG","msg":"x"}`, slog.Group("g", "level", "DEBUG"))
		log.Log(context.Background(), l, "workload output", "workload_id", "W1", "line", `"level":"ERROR"`)
	}
	lines := bytes.Split(bytes.TrimSpace(buf.Bytes()), []byte("\n"))
	for _, line := range lines {
		got, ok := slogLevel(line)
		want, _, _ := parseLine(line, slog.LevelWarn)
		if !ok || got != want {
			t.Errorf("slogLevel(%s) = %v %v, parseLine reads %v", line, got, ok, want)
		}
	}
	for _, line := range []string{
		`level=DEBUG msg=x`,
		`{"msg":"x","level":"DEBUG"}`,
		`{"time":"a\",\"level\":\"DEBUG\",\"msg\":\"x","level":"ERROR","msg":"m"}`,
		`{"time":"a\","level":"DEBUG","msg":"x"}`,
		`{"level":"DEBUG\",\"msg\":\"","msg":"x"}`,
		`{"level":"DEBUG"}`,
		`{"time":"t","level":"INFO+2","msg":"x"}`,
	} {
		if l, ok := slogLevel([]byte(line)); ok {
			t.Errorf("slogLevel(%s) = %v: a line not in slog's layout, or a level it does not name, is parseLine's", line, l)
		}
	}
}
