package steps

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestStepsOnlyAtDebug: a timer exists only when the logger logs at debug level; its
// line names every step, in order, and the total.
func TestStepsOnlyAtDebug(t *testing.T) {
	var buf bytes.Buffer
	info := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if tm := Start(info); tm != nil {
		t.Fatalf("a timer at info level")
	}
	var nilTimer *Timer
	nilTimer.Step("x")
	nilTimer.Log(info, "nothing")
	if buf.Len() != 0 {
		t.Fatalf("a nil timer logged %q", buf.String())
	}
	debug := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	tm := Start(debug)
	tm.Step("decode")
	tm.Step("start")
	tm.Log(debug, "deploy steps", "workload_id", "W1")
	line := buf.String()
	for _, want := range []string{"msg=\"deploy steps\"", "workload_id=W1", "total=", "steps=\"decode=", " start="} {
		if !strings.Contains(line, want) {
			t.Errorf("line %q lacks %q", line, want)
		}
	}
	if strings.Index(line, "decode=") > strings.Index(line, "start=") {
		t.Errorf("steps out of order: %q", line)
	}
}
