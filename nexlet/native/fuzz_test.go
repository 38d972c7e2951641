package native

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/protocol"
)

// FuzzParseStartRequest parses arbitrary run_requests, as the nexlet does a tenant's
// deploy: no panic, every error names the field (it starts "run_request: " or names
// the lifecycle), and what is accepted is within what the nexlet can run.
func FuzzParseStartRequest(f *testing.F) {
	for _, s := range []string{
		`{"uri":"file:///bin/true","argv":["a"],"environment":{"A":"b"},"description":"d","expose_ports":[8080]}`,
		`{"uri":"nats://bucket/name:tag"}`,
		`{"uri":"file:///bin/true","workdir":"/tmp","limits":{"memory_max":"256M","cpu_max":0.5,"pids_max":10},"stop_grace":"5s","restart":{"policy":"always","max":2,"backoff":"1s"},"encrypted_environment":{"base64_encrypted_env":"AA==","encrypted_by":"X"}}`,
		`{"uri":"file:///bin/true","limits":{"memory_max":1048576}}`,
		`{"uri":"file:///bin/true","limits":{"memory_max":"1.5Gi"}}`,
		`{"uri":"file:///bin/true","limits":{"memory_max":"lots"}}`,
		`{"uri":"file:///bin/true","restart":{"policy":"sometimes"}}`,
		`{"uri":"file:///bin/true","stdin":"x"}`,
		`{"uri":"file:///bin/true"} {}`,
		`{"uri":"oci://x/y"}`,
		`{"argv":[]}`,
	} {
		f.Add(s, true)
		f.Add(s, false)
	}
	f.Fuzz(func(t *testing.T, rr string, job bool) {
		lc := protocol.LifecycleService
		if job {
			lc = protocol.LifecycleJob
		}
		p, err := parseStartRequest(rr, lc)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "run_request: ") {
				t.Fatalf("%q: error %q does not say it is the run_request's", rr, err)
			}
			return
		}
		switch {
		case p.art.scheme == "file" && !filepath.IsAbs(p.art.path),
			p.art.scheme == "nats" && (p.art.bucket == "" || p.art.object == ""),
			p.art.scheme != "file" && p.art.scheme != "nats":
			t.Fatalf("%q accepted with artifact %+v", rr, p.art)
		case p.limits.MemoryMax < 0 || p.limits.CPUMax < 0 || p.limits.PidsMax < 0:
			t.Fatalf("%q accepted with limits %+v", rr, p.limits)
		case p.grace < 0, p.maxRestarts < 0, p.backoff <= 0 || p.backoff > MaxBackoff:
			t.Fatalf("%q accepted with grace %v, max restarts %d, backoff %v", rr, p.grace, p.maxRestarts, p.backoff)
		case p.policy != RestartNever && p.policy != RestartOnFailure && p.policy != RestartAlways:
			t.Fatalf("%q accepted with restart policy %q", rr, p.policy)
		case p.req.Workdir != "" && !filepath.IsAbs(p.req.Workdir):
			t.Fatalf("%q accepted with workdir %q", rr, p.req.Workdir)
		}
		for k := range p.req.Environment {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				t.Fatalf("%q accepted with environment key %q", rr, k)
			}
			for _, res := range reservedEnv {
				if k == res {
					t.Fatalf("%q accepted setting %s", rr, k)
				}
			}
		}
		for _, port := range p.req.ExposePorts {
			if port < 1 || port > 65535 {
				t.Fatalf("%q accepted with port %d", rr, port)
			}
		}
	})
}

// FuzzParseUIDRange: no panic, and a range accepted is within its bounds and reads
// back the same.
func FuzzParseUIDRange(f *testing.F) {
	for _, s := range []string{"61184-65519", " 1 - 2 ", "0-5", "5-4", "1-2147483648", "-", "1-2-3", "+1-+2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		lo, hi, err := ParseUIDRange(s)
		if err != nil {
			if !strings.Contains(err.Error(), fmt.Sprintf("uid range %q", s)) {
				t.Fatalf("%q: error %q does not name the range", s, err)
			}
			return
		}
		if lo == 0 || hi < lo || hi >= 1<<31 {
			t.Fatalf("%q accepted as %d-%d", s, lo, hi)
		}
		if lo2, hi2, err := ParseUIDRange(fmt.Sprintf("%d-%d", lo, hi)); err != nil || lo2 != lo || hi2 != hi {
			t.Fatalf("%q: %d-%d read back as %d-%d, %v", s, lo, hi, lo2, hi2, err)
		}
	})
}

// FuzzRecords reads a workload's record files and its stop record holding arbitrary
// bytes, as a nexlet does after a crash (a record cut short, a disk error): no panic,
// and what is read is within what a nexlet writes (counts not negative, a stop's grace
// not negative); the records a nexlet writes read back the same.
func FuzzRecords(f *testing.F) {
	f.Add("1234 5678", "0 exited", "1 1 run=1234-5678 end=1700000000000 backoff=100 exit status 1",
		"2 run=1234-5678 t0=99 uid=61200", "2", "1700000000000 10000 tenant native")
	f.Add("", "", "", "", "", "")
	f.Add("1 2", "x", "1 2 run=- end=x", "1 run=- t0=1 uid=-", "-1", "1 -5")
	f.Add("99999999999999999999 1", "-0 ", "-7 -1 run=1234-5678 end=-1 backoff=-100 r", "-3 run=x t0=1 uid=4294967296", "9223372036854775807", "9223372036854775807 9223372036854775807 a b")
	// Records a nexlet never writes, read before as a negative restart count (a budget
	// that starts below zero: more restarts than the policy allows) or a negative or
	// wrapped-around stop grace.
	f.Add("", "", "-7 -1 run=- end=1 backoff=-100 r", "-3 run=- t0=1 uid=-", "", "1700000000000 -5 tenant native")
	dir := f.TempDir()
	n := &Nexlet{cfg: Config{RuntimeDir: dir}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	const id = "W1"
	if err := os.MkdirAll(n.recordDir(id), 0o700); err != nil {
		f.Fatal(err)
	}
	if err := os.MkdirAll(n.stopsDir(), 0o700); err != nil {
		f.Fatal(err)
	}
	write := func(t *testing.T, path, text string) {
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, pid, exit, restart, launch, restarts, stop string) {
		rec := n.recordDir(id)
		write(t, filepath.Join(rec, "pid"), pid)
		write(t, filepath.Join(rec, "exit"), exit)
		write(t, filepath.Join(rec, "restart"), restart)
		write(t, filepath.Join(rec, "launch"), launch)
		write(t, filepath.Join(rec, "restarts"), restarts)
		write(t, filepath.Join(n.stopsDir(), id), stop)

		if p, ok := n.readPID(id); ok && p.PID <= 1 {
			t.Fatalf("pid record %q read as %+v", pid, p)
		}
		n.readTombstone(id)
		if d, ok := n.readRestartDue(id); ok && (d.restarts < 0 || d.backoff < 0) {
			t.Fatalf("restart record %q read as %+v", restart, d)
		}
		if l, ok := n.readLaunch(id); ok && l.restarts < 0 {
			t.Fatalf("launch record %q read as %+v", launch, l)
		}
		if r := n.readRestarts(id); r < 0 {
			t.Fatalf("restarts record %q read as %d", restarts, r)
		}
		if m, ok := n.readStopMark(id); ok && m.grace < 0 {
			t.Fatalf("stop record %q read with grace %v", stop, m.grace)
		}
	})
}

// TestRecordsRoundTrip: the records a nexlet writes read back the same.
func TestRecordsRoundTrip(t *testing.T) {
	n := &Nexlet{cfg: Config{RuntimeDir: t.TempDir()}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	const id = "W1"
	p := procid.ID{PID: 1234, Start: 5678}
	if err := n.writePID(id, p); err != nil {
		t.Fatal(err)
	}
	if got, ok := n.readPID(id); !ok || got != p {
		t.Fatalf("pid record read as %+v, %v", got, ok)
	}
	n.writeTombstone(id, 3, "exit status 3: a reason with spaces")
	if e, ok := n.readTombstone(id); !ok || e.Code != 3 || e.Reason != "exit status 3: a reason with spaces" {
		t.Fatalf("tombstone read as %+v, %v", e, ok)
	}
	end := time.UnixMilli(time.Now().UnixMilli())
	n.writeRestartDue(id, restartDue{restarts: 2, last: procid.Exit{Code: 1, Reason: "exit status 1"}, end: end, backoff: 250 * time.Millisecond})
	if d, ok := n.readRestartDue(id); !ok || d.restarts != 2 || d.last.Code != 1 || d.last.Reason != "exit status 1" || !d.end.Equal(end) || d.backoff != 250*time.Millisecond {
		t.Fatalf("restart record read as %+v, %v", d, ok)
	}
	n.writeRestarts(id, 4)
	if r := n.readRestarts(id); r != 4 {
		t.Fatalf("restarts record read as %d", r)
	}
	n.writeLaunch(id, 5, ident{uid: 61200, dynamic: true})
	if l, ok := n.readLaunch(id); !ok || l.restarts != 5 || l.run != p.String() || !l.hasUID || l.uid != 61200 {
		t.Fatalf("launch record read as %+v, %v", l, ok)
	}
}
