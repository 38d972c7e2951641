package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// testBackend is a small in-memory Backend; the real one is the daemon's.
type testBackend struct {
	mu       sync.Mutex
	secrets  map[string]map[string][]byte
	reloadIn chan struct{} // when non-nil, Reload signals here and then waits on reloadGo
	reloadGo chan struct{}
	reload   ReloadResult
	lameduck time.Duration
	restarts []string
	follow   chan LogLine
	reg      *prometheus.Registry
	partial  *PartialList // Workloads answers partial when set
	// listGate, when set, holds each Workloads call until it is closed; lists counts
	// the calls under way and the most at once.
	listGate chan struct{}
	lists    struct{ now, most, calls int }
	rows     int // Workloads answers this many rows when set
}

func newTestBackend() *testBackend {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nexd_reloads_total", Help: "Reloads by outcome."}, []string{"outcome"})
	reg.MustRegister(c)
	c.WithLabelValues("ok").Add(2)
	return &testBackend{secrets: map[string]map[string][]byte{}, reload: ReloadResult{OK: true, Applied: []string{"tags"}}, reg: reg}
}

func (b *testBackend) Status(ctx context.Context) (Status, error) {
	return Status{NodeID: "NNODE", Name: "lab", Nexus: "nexus", Version: "1.0.0", State: StateRunning,
		Uptime: Duration(90 * time.Second), NATS: NATSStatus{Server: "nats://127.0.0.1:4222", Connected: true, RTT: Duration(time.Millisecond)},
		Cgroup: CgroupStatus{Mode: "v1", Enforced: []string{"memory"}}, Workloads: map[string]int{"running": 2}}, nil
}

func (b *testBackend) Reload(ctx context.Context) (ReloadResult, error) {
	if b.reloadIn != nil {
		b.reloadIn <- struct{}{}
		select {
		case <-b.reloadGo:
		case <-ctx.Done():
			return ReloadResult{}, ctx.Err()
		}
	}
	return b.reload, nil
}

func (b *testBackend) Lameduck(ctx context.Context, d time.Duration) (LameduckResult, error) {
	b.mu.Lock()
	b.lameduck = d
	b.mu.Unlock()
	return LameduckResult{Until: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).Add(d)}, nil
}

func (b *testBackend) Nexlets(ctx context.Context) ([]Nexlet, error) {
	return []Nexlet{{Name: "native", Type: "native", PID: 42, State: "running", Health: "healthy"}}, nil
}

func (b *testBackend) RestartNexlet(ctx context.Context, name string) error {
	if name != "native" {
		return fmt.Errorf("nexlet %q: %w", name, ErrNotFound)
	}
	b.mu.Lock()
	b.restarts = append(b.restarts, name)
	b.mu.Unlock()
	return nil
}

func (b *testBackend) Workloads(ctx context.Context) ([]Workload, error) {
	b.mu.Lock()
	b.lists.now++
	b.lists.calls++
	b.lists.most = max(b.lists.most, b.lists.now)
	b.mu.Unlock()
	if b.listGate != nil {
		select {
		case <-b.listGate:
		case <-ctx.Done():
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lists.now--
	if b.rows > 0 {
		ws := make([]Workload, b.rows)
		for i := range ws {
			ws[i] = Workload{ID: fmt.Sprintf("W%07d", i), Name: "web", Namespace: "tenant", State: "running"}
		}
		return ws, nil
	}
	if b.partial != nil {
		return []Workload{{ID: "W1", Name: "web"}}, b.partial
	}
	return nil, nil
}

func (b *testBackend) Logs(ctx context.Context, q LogQuery) ([]LogLine, error) {
	return []LogLine{{Msg: "hello", Nexlet: q.Nexlet, WorkloadID: q.Workload, Attrs: map[string]any{"lines": q.Lines,
		"history": q.History, "since": q.Since.Format(time.RFC3339Nano)}}}, nil
}

func (b *testBackend) FollowLogs(ctx context.Context, q LogQuery) (<-chan LogLine, error) {
	return b.follow, nil
}

func (b *testBackend) Config(ctx context.Context) (json.RawMessage, error) {
	return json.RawMessage(`{"nexus":"nexus","nats":{"password":"<redacted>"}}`), nil
}

func (b *testBackend) Secrets() SecretStore { return b }
func (b *testBackend) Metrics() http.Handler {
	return promhttp.HandlerFor(b.reg, promhttp.HandlerOpts{})
}

func (b *testBackend) Set(ns, key string, value []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.secrets[ns] == nil {
		b.secrets[ns] = map[string][]byte{}
	}
	b.secrets[ns][key] = value
	return nil
}

func (b *testBackend) List(ns string) ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var ks []string
	for k := range b.secrets[ns] {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks, nil
}

func (b *testBackend) Delete(ns, key string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.secrets[ns][key]; !ok {
		return fmt.Errorf("secret %s/%s: %w", ns, key, ErrNotFound)
	}
	delete(b.secrets[ns], key)
	return nil
}

func startServer(t *testing.T, b Backend, opts ServerOptions) (*Server, *Client) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "nexd.sock")
	opts.Backend = b
	s, err := Listen(path, opts)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	c := NewClient(path)
	t.Cleanup(c.Close)
	return s, c
}

func TestDefaultSocketPath(t *testing.T) {
	tests := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{}, "/run/nex/nexd.sock"},
		{map[string]string{"RUNTIME_DIRECTORY": "/run/nex"}, "/run/nex/nexd.sock"},
		{map[string]string{"RUNTIME_DIRECTORY": "/run/a:/run/b"}, "/run/a/nexd.sock"},
		{map[string]string{"RUNTIME_DIRECTORY": "/run/a", "NEX_CONTROL_SOCKET": "/tmp/x.sock"}, "/tmp/x.sock"},
	}
	for _, tt := range tests {
		if got := DefaultSocketPath(func(k string) string { return tt.env[k] }); got != tt.want {
			t.Errorf("DefaultSocketPath(%v) = %q, want %q", tt.env, got, tt.want)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	b := newTestBackend()
	b.follow = make(chan LogLine)
	_, c := startServer(t, b, ServerOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), callWait)
	defer cancel()

	st, err := c.Status(ctx)
	if err != nil || st.NodeID != "NNODE" || st.Uptime.Std() != 90*time.Second || st.Workloads["running"] != 2 {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	res, err := c.Reload(ctx)
	if err != nil || !res.OK || res.Applied[0] != "tags" {
		t.Fatalf("Reload = %+v, %v", res, err)
	}
	b.reload = ReloadResult{OK: false, Errors: []string{"nexus: cannot change without restart", "tags.nex.x: reserved prefix"}}
	res, err = c.Reload(ctx)
	if err != nil || res.OK || len(res.Errors) != 2 {
		t.Fatalf("rejected Reload = %+v, %v", res, err)
	}
	ld, err := c.Lameduck(ctx, 2*time.Minute)
	if err != nil || !ld.Until.Equal(time.Date(2030, 1, 1, 0, 2, 0, 0, time.UTC)) || b.lameduck != 2*time.Minute {
		t.Fatalf("Lameduck = %+v, %v (backend got %v)", ld, err, b.lameduck)
	}
	ns, err := c.Nexlets(ctx)
	if err != nil || len(ns) != 1 || ns[0].PID != 42 {
		t.Fatalf("Nexlets = %+v, %v", ns, err)
	}
	if err := c.RestartNexlet(ctx, "native"); err != nil {
		t.Fatalf("RestartNexlet: %v", err)
	}
	if err := c.RestartNexlet(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RestartNexlet(nope) = %v, want not found", err)
	}
	ws, err := c.Workloads(ctx)
	if err != nil || ws == nil || len(ws) != 0 {
		t.Fatalf("Workloads = %#v, %v", ws, err)
	}
	ls, err := c.Logs(ctx, LogQuery{Nexlet: "native", Lines: 5})
	if err != nil || len(ls) != 1 || ls[0].Nexlet != "native" || ls[0].Attrs["lines"] != float64(5) || ls[0].Attrs["history"] != false {
		t.Fatalf("Logs = %+v, %v", ls, err)
	}
	since := time.Date(2026, 12, 1, 10, 0, 0, 123456789, time.UTC)
	ls, err = c.Logs(ctx, LogQuery{Workload: "W1", History: true, Since: since, Lines: 2})
	if err != nil || len(ls) != 1 || ls[0].Attrs["history"] != true || ls[0].Attrs["since"] != since.Format(time.RFC3339Nano) {
		t.Fatalf("Logs (history) = %+v, %v", ls, err)
	}
	if _, err := c.Logs(ctx, LogQuery{Nexlet: "native", History: true}); err == nil || !strings.Contains(err.Error(), "history needs workload") {
		t.Fatalf("history without a workload: %v", err)
	}
	cfg, err := c.Config(ctx)
	if err != nil || !strings.Contains(string(cfg), "<redacted>") {
		t.Fatalf("Config = %s, %v", cfg, err)
	}

	if err := c.SetSecret(ctx, "default", "DB_PASS", []byte("s3cret")); err != nil {
		t.Fatalf("SetSecret: %v", err)
	}
	if string(b.secrets["default"]["DB_PASS"]) != "s3cret" {
		t.Fatalf("secret not stored: %v", b.secrets)
	}
	keys, err := c.ListSecrets(ctx, "default")
	if err != nil || len(keys) != 1 || keys[0] != "DB_PASS" {
		t.Fatalf("ListSecrets = %v, %v", keys, err)
	}
	if ok, err := c.SecretExists(ctx, "default", "DB_PASS"); !ok || err != nil {
		t.Fatalf("SecretExists = %v, %v", ok, err)
	}
	if err := c.DeleteSecret(ctx, "default", "DB_PASS"); err != nil {
		t.Fatalf("DeleteSecret: %v", err)
	}
	if err := c.DeleteSecret(ctx, "default", "DB_PASS"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteSecret again = %v, want not found", err)
	}
	if err := c.SetSecret(ctx, ".hidden", "x", nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("SetSecret(.hidden) = %v, want invalid", err)
	}

	// Metrics: scraped and parsed as Prometheus text.
	m, err := c.Metrics(ctx)
	if err != nil {
		t.Fatalf("Metrics: %v", err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(m)))
	if err != nil {
		t.Fatalf("parse metrics %q: %v", m, err)
	}
	if f := fams["nexd_reloads_total"]; f == nil || f.GetMetric()[0].GetCounter().GetValue() != 2 {
		t.Fatalf("nexd_reloads_total missing or wrong in %q", m)
	}

	// Follow streams lines as they come and ends with the caller's context.
	fctx, cancel := context.WithCancel(ctx)
	got := make(chan LogLine, 4)
	done := make(chan error, 1)
	go func() {
		done <- c.FollowLogs(fctx, LogQuery{Workload: "W1"}, func(l LogLine) error { got <- l; return nil })
	}()
	for i := range 3 {
		b.follow <- LogLine{Msg: fmt.Sprint("line ", i), WorkloadID: "W1"}
		select {
		case l := <-got:
			if l.Msg != fmt.Sprint("line ", i) {
				t.Fatalf("followed line %d = %+v", i, l)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("followed line %d never arrived", i)
		}
	}
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("FollowLogs: %v", err)
	}
}

func TestSocketCreation(t *testing.T) {
	tests := []struct {
		allow string
		mode  os.FileMode
	}{{"", 0o660}, {AllowNone, 0o660}, {AllowStatus, 0o666}}
	for _, tt := range tests {
		t.Run("allow="+tt.allow, func(t *testing.T) {
			s, _ := startServer(t, newTestBackend(), ServerOptions{AllowOthers: tt.allow})
			fi, err := os.Stat(s.Path())
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != tt.mode {
				t.Fatalf("socket mode = %v, want socket %o", fi.Mode(), tt.mode)
			}
			di, err := os.Stat(filepath.Dir(s.Path()))
			if err != nil || di.Mode().Perm() != 0o755 {
				t.Fatalf("socket dir mode = %v, %v; want 0755", di.Mode(), err)
			}
		})
	}
	if _, err := Listen(filepath.Join(t.TempDir(), "x.sock"), ServerOptions{Backend: newTestBackend(), AllowOthers: "everyone"}); err == nil {
		t.Fatal("Listen accepted allow_others=everyone")
	}
}

func TestStaleSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nexd.sock")

	// A socket nobody serves any more is replaced.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	s, err := Listen(path, ServerOptions{Backend: newTestBackend()})
	if err != nil {
		t.Fatalf("Listen over stale socket: %v", err)
	}
	// A live one is not.
	if _, err := Listen(path, ServerOptions{Backend: newTestBackend()}); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("Listen over live socket = %v, want refusal", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("Close left the socket behind: %v", err)
	}
	// Nor is a regular file.
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, ServerOptions{Backend: newTestBackend()}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over regular file = %v, want refusal", err)
	}
}

// rawRequest sends one HTTP request over the socket and returns status and error body.
func rawRequest(t *testing.T, path, method, target, body string) (int, ErrorBody) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://nexd"+target, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var eb ErrorBody
	if resp.StatusCode >= 400 {
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: error content type %q, want application/json", method, target, ct)
		}
		if err := json.Unmarshal(data, &eb); err != nil || eb.Code != resp.StatusCode || eb.Error == "" {
			t.Errorf("%s %s: error body %q is not a JSON error (%v)", method, target, data, err)
		}
	}
	return resp.StatusCode, eb
}

func TestBadRequests(t *testing.T) {
	s, _ := startServer(t, newTestBackend(), ServerOptions{})
	big := `{"delay":"` + strings.Repeat("x", MaxBodyBytes) + `"}`
	tests := []struct {
		name, method, target, body string
		status                     int
		contains                   string
	}{
		{"malformed", "POST", "/v1/lameduck", `{"delay":`, 400, "truncated"},
		{"syntax", "POST", "/v1/lameduck", `{"delay" "2m"}`, 400, "malformed JSON"},
		{"empty", "POST", "/v1/lameduck", ``, 400, "empty"},
		{"bad duration", "POST", "/v1/lameduck", `{"delay":"soon"}`, 400, `"soon"`},
		{"negative", "POST", "/v1/lameduck", `{"delay":"-1m"}`, 400, "negative"},
		{"unknown field", "POST", "/v1/lameduck", `{"dealy":"1m"}`, 400, `"dealy"`},
		{"wrong type", "PUT", "/v1/secrets/default/K", `{"value":3}`, 400, `"value"`},
		{"trailing", "POST", "/v1/lameduck", `{"delay":"1m"} {}`, 400, "after the JSON object"},
		{"oversized", "POST", "/v1/lameduck", big, 413, "exceeds"},
		{"unknown path", "GET", "/v1/nope", "", 404, "no such endpoint"},
		{"root", "GET", "/", "", 404, "no such endpoint"},
		{"other version", "GET", "/v2/status", "", 404, "API version v2"},
		{"wrong method", "DELETE", "/v1/status", "", 405, "not allowed"},
		{"bad follow", "GET", "/v1/logs?follow=yes", "", 400, "follow"},
		{"both filters", "GET", "/v1/logs?nexlet=a&workload=b", "", 400, "mutually exclusive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, eb := rawRequest(t, s.Path(), tt.method, tt.target, tt.body)
			if status != tt.status || !strings.Contains(eb.Error, tt.contains) {
				t.Fatalf("%s %s = %d %q, want %d containing %q", tt.method, tt.target, status, eb.Error, tt.status, tt.contains)
			}
		})
	}
}

func TestConcurrentStatusDuringReload(t *testing.T) {
	b := newTestBackend()
	b.reloadIn, b.reloadGo = make(chan struct{}), make(chan struct{})
	_, c := startServer(t, b, ServerOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	reloadDone := make(chan error, 1)
	go func() {
		res, err := c.Reload(ctx)
		if err == nil && !res.OK {
			err = fmt.Errorf("reload not ok: %+v", res)
		}
		reloadDone <- err
	}()
	select {
	case <-b.reloadIn: // the reload is now in progress and blocked
	case <-ctx.Done():
		t.Fatal("reload never reached the backend")
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := NewClient(c.SocketPath()) // separate connections, as separate nexctl runs
			defer cl.Close()
			st, err := cl.Status(ctx)
			if err == nil && st.NodeID != "NNODE" {
				err = fmt.Errorf("client %d: wrong status %+v", i, st)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	close(b.reloadGo)
	if err := <-reloadDone; err != nil {
		t.Fatalf("Reload: %v", err)
	}
}

func TestParseGroupsLine(t *testing.T) {
	tests := []struct {
		in   string
		want []uint32
		err  bool
	}{
		{"Name:\tx\nGroups:\t4 24 1001 \nNSpid:\t1\n", []uint32{4, 24, 1001}, false},
		{"Groups:\t\n", nil, false},
		{"Groups:\tabc\n", nil, true},
		{"Name:\tx\n", nil, true},
	}
	for _, tt := range tests {
		got, err := parseGroupsLine([]byte(tt.in))
		if (err != nil) != tt.err || fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("parseGroupsLine(%q) = %v, %v; want %v (err %v)", tt.in, got, err, tt.want, tt.err)
		}
	}
	p := Peer{GID: 5, Groups: []uint32{7, 9}}
	for gid, want := range map[uint32]bool{5: true, 9: true, 8: false} {
		if p.inGroup(gid) != want {
			t.Errorf("inGroup(%d) = %v", gid, !want)
		}
	}
}

func (b *testBackend) Reexec(context.Context) error { return nil }

func (b *testBackend) NATSAccess(context.Context, time.Duration) (NATSAccess, error) {
	return NATSAccess{}, ErrNotFound
}

// TestWorkloadsPartial: a Backend's partial list reaches the client as the rows it has
// and a *PartialList naming the missing nexlets (header Nex-Partial; the body stays
// the list); a whole list has no header and no error.
func TestWorkloadsPartial(t *testing.T) {
	b := newTestBackend()
	_, c := startServer(t, b, ServerOptions{})
	ctx := t.Context()
	if ws, err := c.Workloads(ctx); err != nil || len(ws) != 0 {
		t.Fatalf("whole list: %+v %v", ws, err)
	}
	b.mu.Lock()
	b.partial = &PartialList{Wait: "2s", Missing: []protocol.MissingNexlet{{ID: "AECHO", Name: "echo-a", Reason: "no answer within 2s"}}}
	b.mu.Unlock()
	ws, err := c.Workloads(ctx)
	var p *PartialList
	if !errors.As(err, &p) || len(ws) != 1 || ws[0].ID != "W1" || p.Wait != "2s" || len(p.Missing) != 1 || p.Missing[0].ID != "AECHO" {
		t.Fatalf("partial list: %+v %v", ws, err)
	}
	if want := "the node listed only part of its workloads; missing those of nexlet echo-a (AECHO): no answer within 2s"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
}

// TestAdminListsWaitTheirTurn: each workload list asks every nexlet for its whole list
// and holds the rows until written, and admins may hold up to MaxConns connections:
// that many lists at once were answered at once, the node's memory growing with them.
// Now MaxLists are answered at once and the others wait their turn: with three times
// as many asked at once, the backend is asked MaxLists times until they end, and every
// list is answered.
func TestAdminListsWaitTheirTurn(t *testing.T) {
	var log testkit.Buffer
	b := newTestBackend()
	b.listGate = make(chan struct{})
	_, c := startServer(t, b, ServerOptions{Logger: slog.New(slog.NewTextHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	const asked = 3 * MaxLists
	errs := make(chan error, asked)
	for range asked {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := c.Workloads(ctx)
			errs <- err
		}()
	}
	calls := func() int {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.lists.calls
	}
	waiting := func() int { return strings.Count(log.String(), "a workload list waits its turn") }
	// Every list asked either with the backend or waiting for its turn (or, before,
	// more with the backend than the bound).
	testkit.Eventually(t, "every list with the backend or waiting its turn", func() bool {
		return calls() > MaxLists || calls() == MaxLists && waiting() == asked-MaxLists
	})
	if n := calls(); n != MaxLists {
		t.Errorf("%d lists asked of the backend at once, want %d (MaxLists)", n, MaxLists)
	}
	close(b.listGate)
	for range asked {
		if err := <-errs; err != nil {
			t.Errorf("a list: %v", err)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lists.calls != asked || b.lists.most > MaxLists {
		t.Errorf("the backend was asked %d lists, at most %d at once; want %d, at most %d", b.lists.calls, b.lists.most, asked, MaxLists)
	}
}

// TestAdminListNeverReadKeepsNoTurn: an admin's writes have no deadline, so a client
// that asked for a list and never reads the answer would hold its turn for good and, with
// MaxLists of them, every admin's list would wait. Each write of a list's answer is
// bounded by the request bound instead (a client that reads, however slowly, is served):
// the next list is answered.
func TestAdminListNeverReadKeepsNoTurn(t *testing.T) {
	b := newTestBackend()
	b.rows = 20000 // an answer of about 2 MB, more than the socket's buffers take
	s, c := startServer(t, b, ServerOptions{MaxLists: 1, ReadTimeout: 2 * time.Second})
	conn, err := net.Dial("unix", s.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("GET /v1/workloads HTTP/1.1\r\nHost: nexd\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the unread list asked of the backend", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.lists.calls == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if ws, err := c.Workloads(ctx); err != nil || len(ws) != b.rows {
		t.Fatalf("a list while another's answer is never read: %d rows, %v; want %d", len(ws), err, b.rows)
	}
}
