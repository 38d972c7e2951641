package native

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
	if !testkit.WaitFor(testkit.DefaultWait, func() bool { return per() <= 1.2 }) {
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
	testkit.WaitFor(testkit.DefaultWait, func() bool { return runtime.NumGoroutine()-g0 <= k+k/5 })
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

// lineRecorder is a watcher's line function that keeps every line, by stream; the
// first line of stream block waits for release.
type lineRecorder struct {
	mu      sync.Mutex
	lines   map[string][]string
	block   string
	blocked chan struct{} // closed when the blocking line came
	release chan struct{}
}

func newLineRecorder(block string) *lineRecorder {
	return &lineRecorder{lines: map[string][]string{}, block: block, blocked: make(chan struct{}), release: make(chan struct{})}
}

func (lr *lineRecorder) line(s *stream, b []byte) bool {
	lr.mu.Lock()
	lr.lines[s.name] = append(lr.lines[s.name], strings.TrimRight(string(b), "\r\n"))
	first := s.name == lr.block && len(lr.lines[s.name]) == 1
	lr.mu.Unlock()
	if first {
		close(lr.blocked)
		<-lr.release
	}
	return true
}

func (lr *lineRecorder) of(name string) []string {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return slices.Clone(lr.lines[name])
}

// outputPipe is a pipe watched as stream name: the test writes to the returned end.
func outputPipe(t *testing.T, wt *watcher, name string) *os.File {
	t.Helper()
	w, _ := outputPipeTok(t, wt, name)
	return w
}

// outputPipeTok is outputPipe with the stream's token in the watcher.
func outputPipeTok(t *testing.T, wt *watcher, name string) (*os.File, uint64) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(p[0], true); err != nil {
		t.Fatal(err)
	}
	w := os.NewFile(uintptr(p[1]), name)
	t.Cleanup(func() { w.Close() })
	tok, err := wt.addOutput(&workload{id: name}, p[0], name)
	if err != nil {
		t.Fatal(err)
	}
	return w, tok
}

// TestReadNowForwardsWithoutTheLoop: readNow reads the streams it is given and
// forwards their lines before it returns, on the caller's goroutine (a start's,
// right after its reply), with no loop running: complete lines go, the start of a line
// waits for its end, another stream is not touched, and a stream whose writer closed
// ends with its last piece (one read a stream a call, as the loop's). With readNow doing nothing, no line came.
func TestReadNowForwardsWithoutTheLoop(t *testing.T) {
	lr := newLineRecorder("")
	wt, err := makeWatcher(slog.New(slog.DiscardHandler), lr.line)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		wt.rmu.Lock()
		wt.closeAll()
		wt.rmu.Unlock()
	})
	a, ta := outputPipeTok(t, wt, "a")
	b, _ := outputPipeTok(t, wt, "b")
	for _, w := range []struct {
		f    *os.File
		text string
	}{{a, "a1\na2 st"}, {b, "b1\n"}} {
		if _, err := w.f.WriteString(w.text); err != nil {
			t.Fatal(err)
		}
	}
	wt.readNow(0, ta)
	if got, want := lr.of("a"), []string{"a1"}; !slices.Equal(got, want) {
		t.Fatalf("after readNow: a's lines %q, want %q", got, want)
	}
	if got := lr.of("b"); len(got) > 0 {
		t.Errorf("after readNow of a: b's lines %q, want none (not asked for)", got)
	}
	if _, err := a.WriteString("art\na3 last"); err != nil {
		t.Fatal(err)
	}
	a.Close()
	wt.readNow(ta) // one read each call: the rest of a2, and a3's start
	if got, want := lr.of("a"), []string{"a1", "a2 start"}; !slices.Equal(got, want) {
		t.Errorf("after a second readNow: a's lines %q, want %q", got, want)
	}
	wt.readNow(ta) // the end of the stream: a3 goes as it is
	if got, want := lr.of("a"), []string{"a1", "a2 start", "a3 last"}; !slices.Equal(got, want) {
		t.Errorf("after its writer closed: a's lines %q, want %q", got, want)
	}
	wt.mu.Lock()
	_, held := wt.watches[ta]
	wt.mu.Unlock()
	if held {
		t.Error("a's stream ended, yet the watcher still holds it")
	}
	wt.readNow(ta) // ended: nothing more, no read of a closed descriptor
	if got := lr.of("a"); len(got) != 3 {
		t.Errorf("a readNow of an ended stream: lines %q", got)
	}
}

// TestWatcherStopForwardsWhatIsLeft: output the watcher has not read when it stops
// (its readiness came after the stop's in the epoll set: the loop was busy with
// another stream) is read and forwarded before the pipes close, and so is the end of a
// line without its newline. Before, both were lost: 0 of 3 lines.
func TestWatcherStopForwardsWhatIsLeft(t *testing.T) {
	lr := newLineRecorder("busy")
	wt, err := newWatcher(slog.New(slog.DiscardHandler), lr.line)
	if err != nil {
		t.Fatal(err)
	}
	busy := outputPipe(t, wt, "busy")
	last := outputPipe(t, wt, "last")
	if _, err := busy.WriteString("b1\n"); err != nil {
		t.Fatal(err)
	}
	<-lr.blocked // the loop is forwarding busy's line
	// The stop first, then the last output: the loop sees the stop first.
	wt.mu.Lock()
	wt.stopped = true
	wt.mu.Unlock()
	wt.wake()
	if _, err := last.WriteString("l1\nl2\nl3 no newline"); err != nil {
		t.Fatal(err)
	}
	close(lr.release)
	wt.stop()
	if got, want := lr.of("last"), []string{"l1", "l2", "l3 no newline"}; !slices.Equal(got, want) {
		t.Fatalf("the stopped watcher forwarded %q of the last output, want %q", got, want)
	}
}

// TestWatcherDetachForwardsStartedLine: the start of a line the watcher read when it
// detaches goes out as it is (the next nexlet reads only the rest); before, it was lost.
func TestWatcherDetachForwardsStartedLine(t *testing.T) {
	lr := newLineRecorder("")
	wt, err := newWatcher(slog.New(slog.DiscardHandler), lr.line)
	if err != nil {
		t.Fatal(err)
	}
	defer wt.stop()
	out := outputPipe(t, wt, "out")
	if _, err := out.WriteString("whole\nstarted "); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the whole line", func() bool { return len(lr.of("out")) == 1 })
	wt.detach()
	testkit.EventuallyWithin(t, 10*time.Second, "the started line forwarded at the detach", func() bool {
		return slices.Equal(lr.of("out"), []string{"whole", "started "})
	})
}

// TestWatcherFlushForwardsWhatThePipesHold: flush returns once what the pipes held
// when it was called is forwarded (the nexlet's shutdown: before its feed closes), even
// while the loop was busy with another stream; a stream that ended goes whole, its last
// line too, and one still open keeps the start of its line for the next read.
func TestWatcherFlushForwardsWhatThePipesHold(t *testing.T) {
	lr := newLineRecorder("busy")
	wt, err := newWatcher(slog.New(slog.DiscardHandler), lr.line)
	if err != nil {
		t.Fatal(err)
	}
	defer wt.stop()
	busy := outputPipe(t, wt, "busy")
	ended := outputPipe(t, wt, "ended")
	open := outputPipe(t, wt, "open")
	if _, err := busy.WriteString("b1\n"); err != nil {
		t.Fatal(err)
	}
	<-lr.blocked
	flushed := make(chan struct{})
	go func() { defer close(flushed); wt.flush() }()
	testkit.EventuallyWithin(t, 10*time.Second, "the flush asked for", func() bool {
		wt.mu.Lock()
		defer wt.mu.Unlock()
		return len(wt.flushes) == 1
	})
	for _, w := range []struct {
		f    *os.File
		text string
	}{{ended, "e1\ne2 no newline"}, {open, "o1\no2 started"}} {
		if _, err := w.f.WriteString(w.text); err != nil {
			t.Fatal(err)
		}
	}
	ended.Close()
	close(lr.release)
	<-flushed
	if got, want := lr.of("ended"), []string{"e1", "e2 no newline"}; !slices.Equal(got, want) {
		t.Errorf("after the flush: ended stream's lines %q, want %q", got, want)
	}
	if got, want := lr.of("open"), []string{"o1"}; !slices.Equal(got, want) {
		t.Errorf("after the flush: open stream's lines %q, want %q", got, want)
	}
}

// TestFloodIntoUnreadLogSparesQuietWorkload: the nexlet's log is a pipe nobody reads
// (its FIFO while no nexd runs), written through the droppingWriter as in `nexd nexlet
// native`; one workload prints 16 KB lines as fast as it may, another a numbered line
// every 20 ms. Every line of the quiet one reaches its feed, and the flood's keep
// coming past what the pipe holds. Before, the flood's first log line that fit only in
// part held the watcher (finishing the line) until a reader came: no workload's output
// was read any more, 0 of the quiet workload's 100 lines came.
func TestFloodIntoUnreadLogSparesQuietWorkload(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close(); pw.Close() })
	dw, err := newDroppingWriter(int(pw.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	fn := newFakeNode(t)
	fn.startNexlet(Config{Logger: slog.New(slog.NewJSONHandler(dw, nil))})
	const quiet = 100
	fn.mustStart("quiet1", startReq(protocol.LifecycleJob, "quiet1", map[string]any{"uri": "file:///bin/sh",
		"argv": []string{"-c", fmt.Sprintf(`i=0; while [ $i -lt %d ]; do i=$((i+1)); echo "line $i"; sleep 0.02; done`, quiet)}},
		protocol.NatsConnectionData{}))
	fn.mustStart("flood1", startReq(protocol.LifecycleJob, "flood1", map[string]any{"uri": "file:///bin/sh",
		"argv": []string{"-c", `s=$(printf '%16000s' | tr ' ' x); i=0; while [ $i -lt 3000 ]; do echo "$s"; i=$((i+1)); done`}},
		protocol.NatsConnectionData{}))
	// However slowly a loaded host runs the quiet workload: its last line, or a minute.
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && !slices.Contains(fn.logLines("quiet1", "stdout"), fmt.Sprintf("line %d", quiet)) {
		time.Sleep(50 * time.Millisecond)
	}
	seen := map[string]bool{}
	for _, l := range fn.logLines("quiet1", "stdout") {
		seen[l] = true
	}
	lost := 0
	for i := 1; i <= quiet; i++ {
		if !seen[fmt.Sprintf("line %d", i)] {
			lost++
		}
	}
	// The pipe holds 4 of the flood's log lines; its burst alone is OutputBurst.
	floodLines := len(fn.logLines("flood1", "stdout"))
	t.Logf("quiet workload: %d of %d lines lost; flood: %d lines forwarded", lost, quiet, floodLines)
	if lost > 0 {
		t.Errorf("the quiet workload lost %d of %d lines while the nexlet's log was full (want 0)", lost, quiet)
	}
	if floodLines < 100 {
		t.Errorf("only %d flood lines forwarded: its output was not read past a full log", floodLines)
	}
}

// recordingFeed is a Feed that keeps the lines written to it.
type recordingFeed struct {
	mu    sync.Mutex
	lines []string
}

func (f *recordingFeed) Logger(id, _, stream string) io.Writer {
	return feedWriter(func(p []byte) {
		f.mu.Lock()
		f.lines = append(f.lines, id+" "+stream+" "+string(p))
		f.mu.Unlock()
	})
}

func (f *recordingFeed) EmitEvent(string, string, any) error { return nil }

func (f *recordingFeed) all() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.lines)
}

type feedWriter func([]byte)

func (w feedWriter) Write(p []byte) (int, error) { w(p); return len(p), nil }

// TestStartForwardsOutputRightAfterItsReply: a line the workload wrote before its start
// replies is on the feed when the runner's StartReplied, which follows the reply,
// returns (a placement's client waits for both the reply and the workload's
// announcement; the start reads its streams itself right after the reply rather than
// leaving the line to the watcher's goroutine). The start is held after its fork until the workload's
// shell has written its line and exec'd sleep.
func TestStartForwardsOutputRightAfterItsReply(t *testing.T) {
	n := benchNexletLog(t, 0, "", slog.New(slog.DiscardHandler))
	feed := &recordingFeed{}
	n.SetFeed(feed)
	n.afterBegin = func(id string, p *proc) {
		testkit.EventuallyWithin(t, waitLong, "the workload's echo done (it exec'd sleep)", func() bool {
			comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", p.pid))
			return err == nil && strings.TrimSpace(string(comm)) == "sleep"
		})
	}
	for i := range 5 {
		id := fmt.Sprintf("first%d", i)
		req := startReq(protocol.LifecycleService, id, map[string]any{"uri": "file:///bin/sh",
			"argv": []string{"-c", "echo announce " + id + "; exec sleep 600"}}, protocol.NatsConnectionData{})
		if _, err := n.StartWorkload(id, &req, false); err != nil {
			t.Fatal(err)
		}
		want := id + " stdout announce " + id
		n.StartReplied(id)
		if !slices.Contains(feed.all(), want) {
			t.Errorf("start of %s replied; feed lines %q lack %q", id, feed.all(), want)
		}
		if err := n.StopWorkload(id, &protocol.StopWorkloadRequest{Namespace: testNS}); err != nil {
			t.Fatal(err)
		}
	}
}
