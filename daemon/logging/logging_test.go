package logging

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// journalNSEnv names the test a re-executed test binary runs inside a private
// mount namespace (see inJournalNamespace).
const journalNSEnv = "NEXD_TEST_JOURNAL_NS"

func TestMain(m *testing.M) {
	if os.Getenv(journalNSEnv) != "" {
		// A private, empty /run: journald's socket path is ours to listen on.
		if err := unix.Mount("tmpfs", "/run", "tmpfs", 0, "mode=0755"); err != nil {
			fmt.Fprintln(os.Stderr, "logging test: mount tmpfs on /run in the test's mount namespace:", err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

// inJournalNamespace runs the calling test again in a child of the test binary
// with its own mount namespace and an empty /run, because go-systemd's journal
// package only knows /run/systemd/journal/socket. The child listens there as a
// fake journald, whether or not journald runs on this host. It reports true in
// the child (go on with the test) and false in the parent (the child's result
// is already this test's).
func inJournalNamespace(t *testing.T) bool {
	t.Helper()
	if os.Getenv(journalNSEnv) == t.Name() {
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs in a private mount namespace with a fake journald at " + JournalSocket)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+regexp.QuoteMeta(t.Name())+"$", "-test.count=1", "-test.v", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), journalNSEnv+"="+t.Name())
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatalf("in its own mount namespace: %v\n%s", err, out)
	}
	return false
}

// fakeJournald listens where journald would and decodes native-protocol entries,
// including ones passed as a file descriptor.
type fakeJournald struct {
	t    *testing.T
	conn *net.UnixConn
}

func startJournald(t *testing.T) *fakeJournald {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(JournalSocket), 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: JournalSocket, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	j := &fakeJournald{t: t, conn: c}
	t.Cleanup(j.stop)
	return j
}

// stop closes and removes the socket, as a stopped journald leaves none behind.
func (j *fakeJournald) stop() {
	j.conn.Close()
	os.Remove(JournalSocket)
}

type entry map[string][]string

func (e entry) get(k string) string {
	if v := e[k]; len(v) > 0 {
		return v[len(v)-1]
	}
	return ""
}

func (j *fakeJournald) next() entry {
	j.t.Helper()
	buf := make([]byte, 1<<20)
	oob := make([]byte, unix.CmsgSpace(4))
	j.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, oobn, _, _, err := j.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		j.t.Fatalf("fake journald: read: %v", err)
	}
	data := buf[:n]
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			j.t.Fatalf("fake journald: control message: %v", err)
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			j.t.Fatalf("fake journald: rights: %v", err)
		}
		f := os.NewFile(uintptr(fds[0]), "entry")
		defer f.Close()
		f.Seek(0, io.SeekStart)
		if data, err = io.ReadAll(f); err != nil {
			j.t.Fatal(err)
		}
	}
	e, err := parseNative(data)
	if err != nil {
		j.t.Fatalf("fake journald: %v in %q", err, data)
	}
	return e
}

func parseNative(b []byte) (entry, error) {
	e := entry{}
	for len(b) > 0 {
		nl := bytes.IndexByte(b, '\n')
		if nl < 0 {
			return nil, errors.New("entry does not end in a newline")
		}
		line := b[:nl]
		if k, v, ok := bytes.Cut(line, []byte("=")); ok {
			e[string(k)] = append(e[string(k)], string(v))
			b = b[nl+1:]
			continue
		}
		rest := b[nl+1:]
		if len(rest) < 8 {
			return nil, errors.New("binary field without length")
		}
		n := binary.LittleEndian.Uint64(rest[:8])
		if uint64(len(rest)-8) < n+1 || rest[8+n] != '\n' {
			return nil, fmt.Errorf("binary field %s: bad length %d", line, n)
		}
		e[string(line)] = append(e[string(line)], string(rest[8:8+n]))
		b = rest[8+n+1:]
	}
	return e, nil
}

func TestJournalFields(t *testing.T) {
	if !inJournalNamespace(t) {
		return
	}
	jd := startJournald(t)
	l, err := New(Options{Targets: []string{TargetJournal}, NodeID: "NODE1", Namespace: "system", Level: "debug"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	log := l.Slog()

	log.Info("node started", "tags", 3)
	e := jd.next()
	want := map[string]string{
		"MESSAGE": "node started", "PRIORITY": "6", "SYSLOG_IDENTIFIER": "nexd",
		"NEX_NODE_ID": "NODE1", "NEX_NAMESPACE": "system", "TAGS": "3",
	}
	for k, v := range want {
		if got := e.get(k); got != v {
			t.Errorf("%s=%q, want %q (entry %v)", k, got, v, e)
		}
	}
	if !strings.HasSuffix(e.get("CODE_FILE"), "logging_test.go") || e.get("CODE_LINE") == "" {
		t.Errorf("CODE_FILE=%q CODE_LINE=%q, want this test's location", e.get("CODE_FILE"), e.get("CODE_LINE"))
	}

	wl := log.With("nexlet", "native", "namespace", "team-a")
	wl.WithGroup("proc").Warn("workload exited\nwith code 3", "workload_id", "W1", "exit-code", 3, "Message", "shadow", "_trusted", "x", "9lives", "y")
	e = jd.next()
	want = map[string]string{
		"MESSAGE": "workload exited\nwith code 3", "PRIORITY": "4", "NEX_NEXLET": "native",
		"NEX_NAMESPACE": "team-a", "NEX_WORKLOAD_ID": "W1", "NEX_NODE_ID": "NODE1",
		"PROC_EXIT_CODE": "3", "PROC_MESSAGE": "shadow", "PROC__TRUSTED": "x", "PROC_9LIVES": "y",
	}
	for k, v := range want {
		if got := e.get(k); got != v {
			t.Errorf("%s=%q, want %q (entry %v)", k, got, v, e)
		}
	}
	if n := len(e["NEX_NAMESPACE"]); n != 1 {
		t.Errorf("NEX_NAMESPACE appears %d times, want once (the record's)", n)
	}

	log.Error("failed", slog.Group("req", "id", 7), "err", errors.New("boom"))
	e = jd.next()
	if e.get("PRIORITY") != "3" || e.get("REQ_ID") != "7" || e.get("ERR") != "boom" {
		t.Errorf("error entry %v", e)
	}
	log.Debug("tick")
	if e = jd.next(); e.get("PRIORITY") != "7" {
		t.Errorf("debug PRIORITY=%q, want 7", e.get("PRIORITY"))
	}
}

func TestJournalWithPIDAndLargeEntry(t *testing.T) {
	if !inJournalNamespace(t) {
		return
	}
	jd := startJournald(t)
	l, err := New(Options{Targets: []string{TargetJournal}, WithPID: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	big := strings.Repeat("x", 4<<20) // beyond any datagram size: goes as a file descriptor
	if err := l.Slog().Handler().Handle(context.Background(), slog.NewRecord(time.Now(), slog.LevelInfo, big, 0)); err != nil {
		t.Fatal(err)
	}
	e := jd.next()
	if e.get("MESSAGE") != big {
		t.Fatalf("large MESSAGE has %d bytes, want %d", len(e.get("MESSAGE")), len(big))
	}
	if e.get("SYSLOG_PID") != strconv.Itoa(os.Getpid()) {
		t.Errorf("SYSLOG_PID=%q, want %d", e.get("SYSLOG_PID"), os.Getpid())
	}
	if _, ok := e["NEX_NODE_ID"]; ok {
		t.Errorf("NEX_NODE_ID set without a node id: %v", e["NEX_NODE_ID"])
	}
}

func TestJournalMissingSocket(t *testing.T) {
	if !inJournalNamespace(t) {
		return
	}
	_, err := New(Options{Targets: []string{TargetJournal}})
	if err == nil || !strings.Contains(err.Error(), JournalSocket) {
		t.Fatalf("error %v, want one naming %s", err, JournalSocket)
	}
}

func TestFieldName(t *testing.T) {
	cases := map[string]string{
		"workload":              "WORKLOAD",
		"exit-code":             "EXIT_CODE",
		"a.b":                   "A_B",
		"_x":                    "X",
		"9":                     "ATTR_9",
		"priority":              "ATTR_PRIORITY",
		"ünï":                   "N_",
		"":                      "ATTR_",
		strings.Repeat("k", 80): strings.Repeat("K", 64),
	}
	for in, want := range cases {
		if got := FieldName(in); got != want {
			t.Errorf("FieldName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestStdFormats(t *testing.T) {
	cases := []struct {
		format  string
		withPID bool
		check   func(t *testing.T, line string)
	}{
		{"text", false, func(t *testing.T, line string) {
			for _, s := range []string{"level=INFO", `msg="hello world"`, "node=N1", "g.k=v"} {
				if !strings.Contains(line, s) {
					t.Errorf("text line %q lacks %q", line, s)
				}
			}
			if strings.Contains(line, "pid=") {
				t.Errorf("pid without with_pid: %q", line)
			}
		}},
		{"json", true, func(t *testing.T, line string) {
			var m map[string]any
			if err := json.Unmarshal([]byte(line), &m); err != nil {
				t.Fatalf("json line %q: %v", line, err)
			}
			if m["level"] != "INFO" || m["msg"] != "hello world" || m["node"] != "N1" || m["pid"] != float64(os.Getpid()) {
				t.Errorf("json record %v", m)
			}
			if g, _ := m["g"].(map[string]any); g["k"] != "v" {
				t.Errorf("json group %v", m["g"])
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.format, func(t *testing.T) {
			var buf bytes.Buffer
			l, err := New(Options{Targets: []string{TargetStd}, Format: c.format, WithPID: c.withPID, Stderr: &buf})
			if err != nil {
				t.Fatal(err)
			}
			l.Slog().With("node", "N1").WithGroup("g").Info("hello world", "k", "v")
			l.Slog().Debug("hidden at info")
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if len(lines) != 1 {
				t.Fatalf("%d lines, want 1: %q", len(lines), buf.String())
			}
			c.check(t, lines[0])
		})
	}
}

func TestReconfigureReachesEarlierLoggers(t *testing.T) {
	var buf testkit.Buffer
	file := filepath.Join(t.TempDir(), "nexd.log")
	l, err := New(Options{Targets: []string{TargetStd}, Stderr: &buf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	root := l.Slog()
	child := root.With("nexlet", "native").WithGroup("sup")

	child.Debug("before reload")
	if strings.Contains(buf.String(), "before reload") {
		t.Fatal("debug logged at info level")
	}

	if err := l.Reconfigure(Options{Level: "debug", Targets: []string{TargetStd, TargetFile}, File: file, Stderr: &buf}); err != nil {
		t.Fatal(err)
	}
	if !child.Enabled(context.Background(), slog.LevelDebug) {
		t.Fatal("earlier child logger not enabled for debug after reload")
	}
	child.Debug("after reload", "n", 1)
	for name, got := range map[string]string{"stderr": buf.String(), "file": readFile(t, file)} {
		if !strings.Contains(got, "after reload") || !strings.Contains(got, "nexlet=native") || !strings.Contains(got, "sup.n=1") {
			t.Errorf("%s lacks the debug record with its With attrs and group: %q", name, got)
		}
	}

	// A bad reload keeps what runs.
	if err := l.Reconfigure(Options{Level: "loud", Targets: []string{"syslog"}}); err == nil {
		t.Fatal("bad reload accepted")
	} else if !strings.Contains(err.Error(), `"loud"`) || !strings.Contains(err.Error(), `"syslog"`) {
		t.Errorf("error %q does not name both bad values", err)
	}
	if l.Level() != slog.LevelDebug {
		t.Errorf("level %v after a rejected reload, want DEBUG", l.Level())
	}

	// Dropping the file target stops writes to it.
	if err := l.Reconfigure(Options{Level: "warn", Targets: []string{TargetStd}, Stderr: &buf}); err != nil {
		t.Fatal(err)
	}
	child.Warn("only stderr")
	child.Info("filtered")
	if strings.Contains(readFile(t, file), "only stderr") {
		t.Error("file target still written after it was removed")
	}
	if s := buf.String(); !strings.Contains(s, "only stderr") || strings.Contains(s, "filtered") {
		t.Errorf("stderr after warn reload: %q", s)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestValidate(t *testing.T) {
	cases := []struct {
		opts Options
		want string // "" = valid
	}{
		{Options{}, ""},
		{Options{Level: "WARNING", Format: "json", Targets: []string{"std", "nats"}}, ""},
		{Options{Level: "INFO+2"}, ""},
		{Options{Level: "verbose"}, `level "verbose": want debug, info, warn or error`},
		{Options{Format: "xml"}, `format "xml": want text or json`},
		{Options{Targets: []string{"syslog"}}, `target "syslog": want std, file, journal or nats`},
		{Options{Targets: []string{"file"}}, "target file needs a log file path"},
	}
	for _, c := range cases {
		err := Validate(c.opts)
		if c.want == "" {
			if err != nil {
				t.Errorf("%+v: %v", c.opts, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want %q", c.opts, err, c.want)
		}
	}
}

func TestFileTargetOpenError(t *testing.T) {
	p := filepath.Join(t.TempDir(), "missing-dir", "nexd.log")
	if _, err := New(Options{Targets: []string{TargetFile}, File: p}); err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("error %v, want one naming %s", err, p)
	}
}

// setJournalStream points JOURNAL_STREAM at fd 2 (match) or at another inode.
func setJournalStream(t *testing.T, match bool) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(2, &st); err != nil {
		t.Fatal(err)
	}
	ino := st.Ino
	if !match {
		ino++
	}
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, ino))
}

func TestJournalStreamDetection(t *testing.T) {
	setJournalStream(t, true)
	if !JournalStreamIsStderr() {
		t.Errorf("JOURNAL_STREAM=%s (fd 2's device:inode): not detected", os.Getenv("JOURNAL_STREAM"))
	}
	setJournalStream(t, false)
	if JournalStreamIsStderr() {
		t.Errorf("JOURNAL_STREAM=%s (another inode): detected", os.Getenv("JOURNAL_STREAM"))
	}
	for _, v := range []string{"", "garbage", "1:x"} {
		t.Setenv("JOURNAL_STREAM", v)
		if JournalStreamIsStderr() {
			t.Errorf("JOURNAL_STREAM=%q: detected", v)
		}
	}
}

func TestAutoTarget(t *testing.T) {
	if !inJournalNamespace(t) {
		return
	}
	jd := startJournald(t)
	var buf bytes.Buffer
	t.Setenv("JOURNAL_STREAM", "")
	l, err := New(Options{Stderr: &buf})
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Targets(); len(got) != 1 || got[0] != TargetStd {
		t.Errorf("targets %v without JOURNAL_STREAM, want [std]", got)
	}
	setJournalStream(t, true)
	l, err = New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if got := l.Targets(); len(got) != 1 || got[0] != TargetJournal {
		t.Fatalf("targets %v with stderr the journal stream, want [journal]", got)
	}
	l.Slog().Info("to journal")
	if e := jd.next(); e.get("MESSAGE") != "to journal" {
		t.Errorf("journal got %v", e)
	}

	// stderr is the journal but journald's socket is gone: fall back to stderr.
	jd.stop()
	buf.Reset()
	l2, err := New(Options{Stderr: &buf})
	if err != nil {
		t.Fatalf("auto target with no journald socket: %v", err)
	}
	if got := l2.Targets(); len(got) != 1 || got[0] != TargetStd {
		t.Errorf("targets %v, want the std fallback", got)
	}
	if !strings.Contains(buf.String(), JournalSocket) {
		t.Errorf("fallback not explained on stderr: %q", buf.String())
	}
}

func TestAfterCloseFallsBackToStderr(t *testing.T) {
	if !inJournalNamespace(t) {
		return
	}
	jd := startJournald(t)
	var buf bytes.Buffer
	l, err := New(Options{Targets: []string{TargetJournal}, Stderr: &buf})
	if err != nil {
		t.Fatal(err)
	}
	log := l.Slog()
	log.Info("journal only")
	jd.next()
	if buf.Len() != 0 {
		t.Fatalf("journal-only logger wrote to stderr: %q", buf.String())
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	log.Error("exiting", "code", 1)
	if !strings.Contains(buf.String(), "msg=exiting code=1") {
		t.Errorf("record after Close lost: stderr %q", buf.String())
	}
	if err := l.Reconfigure(Options{}); err == nil {
		t.Error("Reconfigure after Close succeeded")
	}
}

func TestNATSTarget(t *testing.T) {
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, srv)
	sub := testnats.Connect(t, srv)
	msgs := make(chan [2]string, 10)
	if _, err := sub.Subscribe("$NEX.FEED.system.logs.>", func(m *nats.Msg) { msgs <- [2]string{m.Subject, string(m.Data)} }); err != nil {
		t.Fatal(err)
	}
	if err := sub.Flush(); err != nil {
		t.Fatal(err)
	}

	l, err := New(Options{Targets: []string{TargetNATS}, WithPID: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	log := l.Slog().With("nexlet", "native")
	log.Info("before attach")

	l.AttachNATS(nc, "NODEX")
	log.Info("hello feed", "n", 1)
	log.Warn("trouble")
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	want := []struct{ subject, contains string }{
		{protocol.NodeLogSubject("NODEX", "stdout"), `msg="hello feed"`},
		{protocol.NodeLogSubject("NODEX", "stderr"), `level=WARN msg=trouble`},
	}
	for _, w := range want {
		select {
		case m := <-msgs:
			if m[0] != w.subject || !strings.Contains(m[1], w.contains) || strings.HasSuffix(m[1], "\n") {
				t.Errorf("got %q on %s, want a line with %q on %s", m[1], m[0], w.contains, w.subject)
			}
			if !strings.Contains(m[1], "pid="+strconv.Itoa(os.Getpid())) {
				t.Errorf("with_pid: %q lacks pid", m[1])
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("no message on %s", w.subject)
		}
	}
	select {
	case m := <-msgs:
		t.Errorf("unexpected message %q on %s (records before AttachNATS must not be published)", m[1], m[0])
	default:
	}

	// Close hands over what is still queued: the last lines before a shutdown.
	const n = 50
	for i := 0; i < n; i++ {
		log.Info("last words", "i", i)
	}
	l.Close()
	log.Info("after close")
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		select {
		case m := <-msgs:
			if !strings.Contains(m[1], "i="+strconv.Itoa(i)) {
				t.Fatalf("record %d: got %q", i, m[1])
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("only %d of %d records published before Close returned", i, n)
		}
	}
}

func TestRingAndFollow(t *testing.T) {
	l, err := New(Options{Targets: []string{TargetStd}, Stderr: io.Discard, RingSize: 5})
	if err != nil {
		t.Fatal(err)
	}
	log := l.Slog().With("workload_id", "W1")
	for i := 0; i < 8; i++ {
		log.Info("rec", "i", i)
	}
	log.Debug("below level")
	got := l.Recent(nil)
	if len(got) != 5 || got[0].Attrs["i"] != "3" || got[4].Attrs["i"] != "7" || got[4].Attrs["workload_id"] != "W1" {
		t.Fatalf("Recent = %+v, want records 3..7", got)
	}
	odd := l.Recent(func(r Record) bool { n, _ := strconv.Atoi(r.Attrs["i"]); return n%2 == 1 })
	if len(odd) != 3 || odd[0].Attrs["i"] != "3" || odd[2].Attrs["i"] != "7" {
		t.Errorf("filtered Recent = %+v, want i=3,5,7", odd)
	}

	ctx, cancel := context.WithCancel(context.Background())
	ch := l.Follow(ctx)
	ch2 := l.Follow(context.Background())
	log.WithGroup("g").Warn("live", "k", "v", "nexlet", "native")
	for _, c := range []<-chan Record{ch, ch2} {
		select {
		case r := <-c:
			if r.Msg != "live" || r.Level != slog.LevelWarn || r.Attrs["g.k"] != "v" || r.Attrs["workload_id"] != "W1" || r.Attrs["nexlet"] != "native" || r.Time.IsZero() {
				t.Errorf("followed %+v", r)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("follower got nothing")
		}
	}
	cancel()
	waitClosed(t, ch)
	l.Close()
	waitClosed(t, ch2)
	if c := l.Follow(context.Background()); !isClosed(c) {
		t.Error("Follow after Close returned an open channel")
	}
	log.Info("after close") // must not panic
	b, _ := json.Marshal(l.Recent(nil)[0])
	if !strings.Contains(string(b), `"level":"INFO"`) {
		t.Errorf("Record JSON %s", b)
	}
}

// TestFollowWatcherEnds: a follower's watcher goroutine ends with its follower, whether
// its context ends or the logger closes first; before, a follower the logger closed
// left its watcher parked on a context that might never end (a 100 such: 100 parked).
func TestFollowWatcherEnds(t *testing.T) {
	l, err := New(Options{Targets: []string{TargetStd}, Stderr: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // the followers outlive the test's checks: only Close ends them
	var chs []<-chan Record
	for range 100 {
		chs = append(chs, l.Follow(ctx))
	}
	ended, cancelOne := context.WithCancel(context.Background())
	one := l.Follow(ended)
	// A watcher not yet run shows only WaitGroup.Go's frame: not counted yet.
	testkit.Eventually(t, "the 101 follow watchers to run", func() bool { return followWatchers() == 101 })
	cancelOne()
	waitClosed(t, one)
	testkit.Eventually(t, "the ended follower's watcher to end", func() bool { return followWatchers() == 100 })
	l.Close()
	for _, ch := range chs {
		waitClosed(t, ch)
	}
	// Close returns once the watchers are gone: no wait here.
	if n := followWatchers(); n != 0 {
		t.Fatalf("%d follow watchers still running after Close, with their context alive", n)
	}
}

// followWatchers counts the goroutines running a follow watcher.
func followWatchers() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	return strings.Count(string(buf), "logging.(*ring).follow.func")
}

func waitClosed(t *testing.T, ch <-chan Record) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("follow channel not closed")
		}
	}
}

func isClosed(ch <-chan Record) bool {
	select {
	case _, ok := <-ch:
		return !ok
	case <-time.After(5 * time.Second):
		return false
	}
}

func TestPriority(t *testing.T) {
	cases := map[slog.Level]int{slog.LevelDebug - 4: 7, slog.LevelDebug: 7, slog.LevelInfo: 6, slog.LevelInfo + 2: 6, slog.LevelWarn: 4, slog.LevelError: 3, slog.LevelError + 4: 2}
	for l, want := range cases {
		if got := Priority(l); got != want {
			t.Errorf("Priority(%v) = %d, want %d", l, got, want)
		}
	}
}

func TestHideWorkloadOutput(t *testing.T) {
	for _, hide := range []bool{true, false} {
		var buf bytes.Buffer
		l, err := New(Options{Targets: []string{TargetStd}, Stderr: &buf, HideWorkloadOutput: hide})
		if err != nil {
			t.Fatal(err)
		}
		log := l.Slog().With("nexlet", "native")
		log.Info(WorkloadOutputMsg, "workload_id", "w1", "line", "hello")
		log.Info("workload started", "workload_id", "w1")
		out := buf.String()
		if strings.Contains(out, "hello") == hide {
			t.Errorf("hide=%v: output line shown=%v:\n%s", hide, !hide, out)
		}
		if !strings.Contains(out, "workload started") {
			t.Errorf("hide=%v: other records must pass:\n%s", hide, out)
		}
		// The ring buffer (nexctl logs --workload) keeps the line either way.
		if len(l.Recent(func(r Record) bool { return r.Msg == WorkloadOutputMsg })) != 1 {
			t.Errorf("hide=%v: ring lost the output line", hide)
		}
		l.Close()
	}
}
