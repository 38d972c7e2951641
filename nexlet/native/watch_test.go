package native

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestOutputLinesAcrossReads: the watcher forwards whole lines however the workload's
// writes split them: a line written in two parts with a pause between, "\r\n" endings,
// a line longer than pumpMaxLine (in pieces of that size), a last line with no newline
// (sent when the stream ends), and stderr apart from stdout.
func TestOutputLinesAcrossReads(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	long := strings.Repeat("x", pumpMaxLine+4464)
	body := "printf a; sleep 0.3; printf 'b\\n'; printf 'crlf\\r\\n'; echo err >&2; printf '%s' " + long + "; printf 'y\\n'; printf tail"
	fn.mustStart("lines1", startReq(protocol.LifecycleJob, "lines1", map[string]any{"uri": "file:///bin/sh",
		"argv": []string{"-c", body}}, protocol.NatsConnectionData{}))
	want := []string{"ab", "crlf", long[:pumpMaxLine], long[pumpMaxLine:] + "y", "tail"}
	testkit.EventuallyWithin(t, waitLong, "every stdout line", func() bool {
		return slices.Equal(fn.logLines("lines1", "stdout"), want)
	})
	if got := fn.logLines("lines1", "stderr"); !slices.Equal(got, []string{"err"}) {
		t.Errorf("stderr lines = %q, want [err]", got)
	}
}

// TestOutputOverRateRestsThenResumes: a workload writing far past its output rate has
// the lines past the burst dropped, not queued, and its stream is read again after the
// rest: a line written a second later arrives.
func TestOutputOverRateRestsThenResumes(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	const flood = 3 * OutputBurst
	body := fmt.Sprintf("i=0; while [ $i -lt %d ]; do echo $i; i=$((i+1)); done; sleep 1.2; echo after", flood)
	fn.mustStart("rate1", startReq(protocol.LifecycleJob, "rate1", map[string]any{"uri": "file:///bin/sh",
		"argv": []string{"-c", body}}, protocol.NatsConnectionData{}))
	fn.waitLog("rate1", "stdout", "after")
	got := fn.logLines("rate1", "stdout")
	if len(got) < OutputBurst || len(got) > OutputBurst+2*OutputRate {
		t.Errorf("%d of %d flood lines forwarded, want about the burst of %d", len(got)-1, flood, OutputBurst)
	}
	if got[0] != "0" || got[len(got)-1] != "after" {
		t.Errorf("first and last lines %q, %q; want 0 and after", got[0], got[len(got)-1])
	}
}

// TestGoroutinesPerWorkload: a running workload costs the nexlet one goroutine (its
// supervisor); its output and its exit are watched by the nexlet's one watcher, not by
// a goroutine (and its stack) per pipe and per process.
func TestGoroutinesPerWorkload(t *testing.T) {
	n := benchNexlet(t, 0)
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "echo hi; exec sleep 600"}}
	const k = 20
	before := runtime.NumGoroutine()
	startServices(t, n, "g", k, run)
	// Short-lived helpers of the starts end; what stays is the steady state.
	per := func() float64 { return float64(runtime.NumGoroutine()-before) / k }
	if !testkit.WaitFor(5*time.Second, func() bool { return per() <= 1.2 }) {
		t.Errorf("%.2f goroutines per running workload, want 1", per())
	}
}

// TestStackPerWorkload: a workload's one goroutine waits as long as the workload runs,
// so what its stack grew to stays allocated. The start's log line and event (a JSON
// handler and an encoding, 8 KB of stack or more) run on a short-lived goroutine; the
// waiting one keeps a small stack. The collector is off while measuring: it halves a
// waiting goroutine's stack at most once a cycle, which would hide a grown one.
func TestStackPerWorkload(t *testing.T) {
	n := benchNexlet(t, 0)
	// As in the nexlet process: JSON log lines, events encoded.
	n.log = slog.New(slog.NewJSONHandler(io.Discard, nil))
	n.SetFeed(encodingFeed{})
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "exec sleep 600"}}
	const k = 100
	// Warm: the first start's helpers (pools, loops) are not the workloads' cost.
	startServices(t, n, "warm", 1, run)
	runtime.GC()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := stackBytes()
	g0 := runtime.NumGoroutine()
	startServices(t, n, "s", k, run)
	testkit.WaitFor(5*time.Second, func() bool { return runtime.NumGoroutine()-g0 <= k+k/5 })
	per := float64(stackBytes()-before) / k
	t.Logf("%.0f bytes of goroutine stack per running workload", per)
	if per > 7<<10 {
		t.Errorf("%.0f bytes of goroutine stack per running workload, want at most %d", per, 7<<10)
	}
}

// encodingFeed encodes events as the runner does before publishing them.
type encodingFeed struct{}

func (encodingFeed) Logger(_, _, _ string) io.Writer { return io.Discard }

func (encodingFeed) EmitEvent(_, _ string, v any) error {
	_, err := json.Marshal(v)
	return err
}

func stackBytes() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}
