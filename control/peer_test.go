package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// Environment of the helper process that plays an unprivileged nexctl.
const (
	helperEnvOp     = "NEXD_CONTROL_TEST_OP"
	helperEnvSocket = "NEXD_CONTROL_TEST_SOCKET"
	helperEnvConns  = "NEXD_CONTROL_TEST_CONNS"
)

func TestMain(m *testing.M) {
	if op := os.Getenv(helperEnvOp); op != "" {
		os.Exit(runHelper(op, os.Getenv(helperEnvSocket)))
	}
	os.Exit(m.Run())
}

// runHelper performs one client call and prints "ok" or "status <code>" / "error <text>".
func runHelper(op, socket string) int {
	c := NewClient(socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	switch op {
	case "status":
		_, err = c.Status(ctx)
	case "reload":
		_, err = c.Reload(ctx)
	case "secrets":
		_, err = c.ListSecrets(ctx, "default")
	case "workloads":
		_, err = c.Workloads(ctx)
	case "hold", "pin":
		return holdConns(op, socket)
	case "bigheader":
		return bigHeader(socket)
	default:
		err = fmt.Errorf("unknown op %q", op)
	}
	var ae *APIError
	switch {
	case err == nil:
		fmt.Println("ok")
	case errors.As(err, &ae):
		fmt.Printf("status %d %s\n", ae.Status, ae.Message)
	default:
		fmt.Printf("error %v\n", err)
	}
	return 0
}

// holdConns plays a local user (or a workload's dynamic uid) that keeps control
// connections open: "hold" opens them and sends nothing, "pin" sends status requests on
// them without end and never reads an answer. It prints "held N" once N are open and
// stays until its stdin closes.
func holdConns(op, socket string) int {
	n, _ := strconv.Atoi(os.Getenv(helperEnvConns))
	var conns []net.Conn
	for range n {
		c, err := net.Dial("unix", socket)
		if err != nil {
			fmt.Printf("error %v\n", err)
			return 1
		}
		conns = append(conns, c)
		if op == "pin" {
			go func() {
				req := []byte("GET /v1/status HTTP/1.1\r\nHost: nexd\r\n\r\n")
				for {
					if _, err := c.Write(req); err != nil {
						return
					}
				}
			}()
		}
	}
	fmt.Printf("held %d\n", len(conns))
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// bigHeader sends a status request with 512 KiB of headers and prints the answer's
// status line.
func bigHeader(socket string) int {
	c, err := net.Dial("unix", socket)
	if err != nil {
		fmt.Printf("error %v\n", err)
		return 1
	}
	defer c.Close()
	go func() {
		_, _ = c.Write([]byte("GET /v1/status HTTP/1.1\r\nHost: nexd\r\nX-Pad: " + strings.Repeat("x", 512<<10) + "\r\n\r\n"))
	}()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Printf("error %v\n", err)
		return 1
	}
	fmt.Print(line)
	return 0
}

// TestPeerCredentials runs the client as a real unprivileged user created for the test.
func TestPeerCredentials(t *testing.T) {
	g := testkit.NewGroup(t)
	u := testkit.NewUser(t) // g is given per call below, as a supplementary group or not
	uname, gname, tgid := u.Name, g.Name, g.GID

	// A world-traversable directory holding a copy of this test binary and the sockets:
	// the go build cache and t.TempDir() are private to root.
	dir := testkit.PublicDir(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper.test")
	testkit.CopyFile(t, self, bin, 0o755)

	call := func(socket, op string, groups []uint32) string {
		t.Helper()
		cmd := u.Command(bin)
		cmd.Env = []string{helperEnvOp + "=" + op, helperEnvSocket + "=" + socket}
		cmd.SysProcAttr.Credential = u.Credential(groups...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper as %s (%s): %v: %s", uname, op, err, out)
		}
		return strings.TrimSpace(string(out))
	}

	tests := []struct {
		name   string
		allow  string
		groups []uint32 // the helper's supplementary groups
		want   map[string]string
	}{
		{"others may read status", AllowStatus, nil,
			map[string]string{"status": "ok", "reload": "status 403", "secrets": "status 403", "workloads": "status 403"}},
		{"others may do nothing", AllowNone, nil,
			// With mode 0660 the kernel already refuses the connect.
			map[string]string{"status": "permission denied"}},
		{"supplementary group member may do everything", AllowNone, []uint32{tgid},
			map[string]string{"status": "ok", "reload": "ok", "secrets": "ok", "workloads": "ok"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			socket := filepath.Join(dir, fmt.Sprintf("s%d", i), "nexd.sock")
			s, err := Listen(socket, ServerOptions{Backend: newTestBackend(), AllowOthers: tt.allow, Group: gname})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s.Serve(ctx) }()
			defer func() { cancel(); <-done }()

			fi, err := os.Stat(socket)
			if err != nil {
				t.Fatal(err)
			}
			if st := fi.Sys().(*syscall.Stat_t); st.Gid != uint32(tgid) {
				t.Fatalf("socket group = %d, want %s (%d)", st.Gid, gname, tgid)
			}
			for op, want := range tt.want {
				if got := call(socket, op, tt.groups); !strings.Contains(got, want) {
					t.Errorf("%s as %s (groups %v) = %q, want %q", op, uname, tt.groups, got, want)
				}
			}
		})
	}

	// And with the socket opened up, AllowNone still refuses others by their credentials.
	socket := filepath.Join(dir, "open", "nexd.sock")
	s, err := Listen(socket, ServerOptions{Backend: newTestBackend(), AllowOthers: AllowNone, Group: gname})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	if got := call(socket, "status", nil); !strings.Contains(got, "status 403") {
		t.Errorf("status as %s with AllowNone on a 0666 socket = %q, want 403", uname, got)
	}
}

// holders starts, as each of users, a helper that keeps conns control connections to
// socket open (op "hold" or "pin", see holdConns) and waits until each says so. stop
// ends them; so does the test's end.
func holders(t *testing.T, bin, socket, op string, conns int, users ...*testkit.User) (stop func()) {
	t.Helper()
	var stops []func()
	stop = func() {
		for _, f := range stops {
			f()
		}
	}
	t.Cleanup(stop)
	for _, u := range users {
		cmd := u.Command(bin)
		cmd.Env = []string{helperEnvOp + "=" + op, helperEnvSocket + "=" + socket, helperEnvConns + "=" + strconv.Itoa(conns)}
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var out testkit.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		stops = append(stops, sync.OnceFunc(func() { stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() }))
		want := fmt.Sprintf("held %d", conns)
		testkit.EventuallyWithin(t, 30*time.Second, u.Name+" holds its connections", func() bool { return out.Contains(want) || out.Contains("error") })
		if !out.Contains(want) {
			t.Fatalf("%s as %s: %s", op, u.Name, out.String())
		}
	}
	return stop
}

// openConns is the server's count of uid's open connections.
func openConns(s *Server, uid uint32) int {
	s.lim.mu.Lock()
	defer s.lim.mu.Unlock()
	return s.lim.per[uid]
}

// holding: users' helpers each keep conns silent connections to s open ("hold"),
// filling a bound. The server drops a silent connection after its header timeout (10 s,
// which no option lengthens: ServerOptions.ReadTimeout only shortens it), and a check
// made once a holder's were gone proved nothing (on a loaded machine, a third uid was
// served: the bound had room again). during runs a check only between two of the
// server's own counts that find every holder's connections open; the holders never dial
// again, so the bound was full all along.
type holding struct {
	t     *testing.T
	s     *Server
	bin   string
	conns int
	users []*testkit.User
	stop  func() // the holders running now
}

// heldAttempts bounds how many times during runs a check whose holders were dropped.
const heldAttempts = 5

// intact: the server counts every holder's connections open.
func (h *holding) intact() bool { return h.each(h.conns) }

// each: the server counts n connections open for every holder.
func (h *holding) each(n int) bool {
	for _, u := range h.users {
		if openConns(h.s, u.UID) != n {
			return false
		}
	}
	return true
}

// counts is each holder's open connections as the server counts them, for messages.
func (h *holding) counts() string {
	var b strings.Builder
	for _, u := range h.users {
		fmt.Fprintf(&b, " uid %d: %d of %d;", u.UID, openConns(h.s, u.UID), h.conns)
	}
	return strings.TrimSuffix(strings.TrimSpace(b.String()), ";")
}

// start starts the holders, after stopping any before them and seeing their connections
// closed (they count against the bound the new ones fill), and reports whether the
// server counts every new connection open within 30 s.
func (h *holding) start() bool {
	h.t.Helper()
	if h.stop != nil {
		h.stop()
		testkit.Eventually(h.t, "the previous holders' connections closed", func() bool { return h.each(0) })
	}
	h.stop = holders(h.t, h.bin, h.s.Path(), "hold", h.conns, h.users...)
	return testkit.WaitFor(30*time.Second, h.intact)
}

// during runs check while every holder's connections are open, as the server counts them
// just before and just after it; when they were not, check is run again with fresh
// holders, heldAttempts times in all. What check saw (it keeps it in variables of the
// caller's) is then what it saw with the bound full.
func (h *holding) during(what string, check func()) {
	h.t.Helper()
	for attempt := 1; attempt <= heldAttempts; attempt++ {
		if !h.intact() && !h.start() {
			h.t.Logf("%s, attempt %d: the holders' connections not all open after 30 s (%s)", what, attempt, h.counts())
			continue
		}
		check()
		if h.intact() {
			return
		}
		h.t.Logf("%s, attempt %d: a holder's connection was dropped meanwhile (%s); again with fresh holders", what, attempt, h.counts())
	}
	h.t.Fatalf("%s: the holders' connections were not all open before and after it in %d attempts (%s)", what, heldAttempts, h.counts())
}

// statusRefused checks that u's status, run while the holders fill the bound of u's
// class (during), is refused at that bound: an error for the client, and the server
// logs the refusal. what names the call in the failure message.
func (h *holding) statusRefused(log *testkit.Buffer, u *testkit.User, what string) {
	h.t.Helper()
	var got string
	var refused int
	h.during(what, func() {
		before := refusals(log, u.UID)
		got = statusAs(h.t, h.bin, h.s.Path(), u)
		refused = refusals(log, u.UID) - before
	})
	if !strings.HasPrefix(got, "error ") || refused == 0 {
		h.t.Errorf("%s: %q, refused %d times, want an error and a refusal", what, got, refused)
	}
}

// refusals counts the server's log records of connections of uid refused at a bound.
func refusals(log *testkit.Buffer, uid uint32) int {
	return strings.Count(log.String(), fmt.Sprintf("msg=\"control connection refused: too many open connections\" uid=%d ", uid))
}

// uidUser is a uid with no passwd entry (as a workload's dynamic uid has none), to run
// the helper as.
func uidUser(uid uint32) *testkit.User {
	return &testkit.User{Name: fmt.Sprintf("uid %d", uid), UID: uid, GID: uid}
}

// statusAs runs the helper's status call as u and returns what it printed: "ok",
// "status <code> …" or "error <text>" (the connection closed unanswered: refused).
func statusAs(t *testing.T, bin, socket string, u *testkit.User) string {
	t.Helper()
	cmd := u.Command(bin)
	cmd.Env = []string{helperEnvOp + "=status", helperEnvSocket + "=" + socket}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("status as %s: %v: %s", u.Name, err, out)
	}
	return strings.TrimSpace(string(out))
}

// publicServer serves a status-only socket (mode 0666, as packaged) in a directory every
// test user can reach, with a copy of this test binary there for them to run.
func publicServer(t *testing.T, opts ServerOptions) (s *Server, bin string) {
	t.Helper()
	dir := testkit.PublicDir(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin = testkit.CopyFile(t, self, filepath.Join(dir, "helper.test"), 0o755)
	opts.Backend, opts.AllowOthers = newTestBackend(), AllowStatus
	s, err = Listen(filepath.Join(dir, "nexd.sock"), opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, bin
}

// TestAttackManyUsersLockOutAdmins: the socket is open to every local uid (status), and
// a tenant gets one dynamic uid per workload, each allowed 16 connections. Uids that
// each stay within their own bound filled the bound on all connections, which admins
// counted against too: 64 workloads held 1024 connections and root's nexctl was refused.
// Here the bounds are shrunk (2 a uid, 4 a class) and two uids fill their class's; root
// is still served (admins are bounded apart), and a third uid gets nothing: its class
// stays bounded. Both checks count only while the server counts the holders' 4
// connections open (holding.during).
func TestAttackManyUsersLockOutAdmins(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	var log testkit.Buffer
	s, bin := publicServer(t, ServerOptions{MaxConns: 4, MaxConnsPerUser: 2, Logger: slog.New(slog.NewTextHandler(&log, nil))})
	lo := testkit.UIDs(t, 3)
	h := &holding{t: t, s: s, bin: bin, conns: 2, users: []*testkit.User{uidUser(lo), uidUser(lo + 1)}}
	c := NewClient(s.Path())
	defer c.Close()
	var err error
	h.during("root's status", func() {
		for range 3 {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err = c.Status(ctx)
			cancel()
			if err != nil {
				return
			}
		}
	})
	if err != nil || refusals(&log, 0) != 0 {
		t.Errorf("root's status while other uids hold every connection of theirs: %v, refused %d times, want served", err, refusals(&log, 0))
	}
	h.statusRefused(&log, uidUser(lo+2), "a third uid's status past its class's bound")
}

// TestAttackClientThatNeverReadsIsDropped: a local user sends status requests without
// end and reads no answer. The server's writes then block; with no write deadline they
// blocked for good and held the connections (and their goroutines) until nexd stopped.
// Now a non-admin connection whose answer cannot be written within the request timeout
// is closed.
func TestAttackClientThatNeverReadsIsDropped(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	s, bin := publicServer(t, ServerOptions{ReadTimeout: time.Second, MaxConnsPerUser: 4})
	u := testkit.NewUser(t)
	holders(t, bin, s.Path(), "pin", 4, u)
	open := func() int { return openConns(s, u.UID) }
	if !testkit.WaitFor(30*time.Second, func() bool { return open() == 0 }) {
		t.Fatalf("%d connections of a client that never reads still open after 30 s", open())
	}
}

// TestAttackLargeHeadersRefused: request headers are read before the peer is
// authorized, and net/http holds up to its default 1 MiB of them per connection: with
// the dynamic uids of many workloads (16 connections each, 1024 for non-admins in all)
// that is about 1 GiB of nexd's memory for a header timeout at a time. A control
// request needs a few hundred bytes, so more than MaxHeaderBytes is refused (431) as a
// real user sends it; before, 512 KiB of headers were read and answered 200.
func TestAttackLargeHeadersRefused(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	s, bin := publicServer(t, ServerOptions{})
	cmd := testkit.NewUser(t).Command(bin)
	cmd.Env = []string{helperEnvOp + "=bigheader", helperEnvSocket + "=" + s.Path()}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v: %s", err, out)
	}
	if got := strings.TrimSpace(string(out)); !strings.Contains(got, " 431 ") {
		t.Errorf("status with 512 KiB of headers from another user: %q, want 431", got)
	}
}

// TestAttackWorkloadsLockOutLocalUsers: a tenant's workloads each run as a dynamic uid of
// their own, and each uid may hold 16 connections, so 64 workloads held all 1024 that
// non-admins shared and another local user's `nexctl status` was refused. Workloads'
// uids (ServerOptions.WorkloadUIDs) now have a bound of their own. Here the bounds are
// shrunk (2 a uid, 4 a class): two uids of the range (no passwd entry, as a dynamic
// uid has none) fill theirs, a local user (a uid outside the range) is still served; a
// third uid of the range is not (its class stays bounded). Both checks count only while
// the server counts the holders' 4 connections open (holding.during).
func TestAttackWorkloadsLockOutLocalUsers(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	lo := testkit.UIDs(t, 4)
	var log testkit.Buffer
	s, bin := publicServer(t, ServerOptions{MaxConns: 4, MaxConnsPerUser: 2, WorkloadUIDs: [2]uint32{lo, lo + 2},
		Logger: slog.New(slog.NewTextHandler(&log, nil))})
	h := &holding{t: t, s: s, bin: bin, conns: 2, users: []*testkit.User{uidUser(lo), uidUser(lo + 1)}}
	local := uidUser(lo + 3)
	var got string
	h.during("a local user's status", func() { got = statusAs(t, bin, s.Path(), local) })
	if got != "ok" || refusals(&log, local.UID) != 0 {
		t.Errorf("a local user's status while workloads' uids hold their every connection: %q, refused %d times, want ok", got, refusals(&log, local.UID))
	}
	h.statusRefused(&log, uidUser(lo+2), "a third workload uid's status past the workloads' bound")
}
